"""Training-step time of ``backend="simigrad"`` against ``backend="inductor"`` on a small GPT (same process, interleaved).

    python bench/bench_step.py                                    # cpu, ~5M params, batch 4 x seq 128, 15 repeats
    python bench/bench_step.py --batch 4,8,16 --repeats 21        # sweep the batch (one compile pair per point)
    python bench/bench_step.py --device cuda --batch 32 --seq 512 --d-model 512 --layers 8
    python bench/bench_step.py --profile                          # + torch.profiler top ops of one step of each
    python bench/bench_step.py --threads 1                        # on a shared, loaded CPU box (see below)
    python bench/bench_step.py --split-contraction separate       # only one form of the split (default: both)
    python bench/bench_step.py --threads 1 --clock cpu            # CPU time of the process: robust to a loaded box

Model: token embedding + positional parameter, pre-LN blocks (LayerNorm, causal attention through
``F.scaled_dot_product_attention(is_causal=True)``, GELU MLP), final LayerNorm, head tied to the embedding, mean
cross-entropy computed inside the model. Both compiled models start from one ``copy.deepcopy`` of the same init.

One simigrad model per ``--split-contraction`` form (``separate``: g1, g2 and a fused sum pass; ``accumulate``:
``addmm`` of the second half into the first, statistics from (g1, g)), all timed against the same inductor model.

Per (batch, seq) point:
  compile  the first forward+backward of each model (Dynamo + AOT + Inductor, FX-graph cache hits/misses counted);
  check    same loss and gradients (relative norm error), simigrad statistics finite, of mode ``batch``, no
           parameter missing, and ``a + b + 2d == |g|^2`` (the two halves add up to the gradient);
  step     forward+backward (``zero_grad(set_to_none=True)`` outside the timer), after warm-up steps; each repeat
           runs both models, the order alternating between repeats;
  read     ``gradient_stats(model, reset=True)`` right after each simigrad step (syncs with the device; timed
           apart from the step, also reported as step+read).
Reported: medians with min/max, the ratio simigrad/inductor of the medians (of the minima in brackets, the median of
the per-repeat ratios in braces), and the median per-repeat ratio of the two forms.
Goal: ratio <= 1.05. Inductor's cache lives in TORCHINDUCTOR_CACHE_DIR (default: a folder under the temp dir),
so reruns compile faster; set it to an empty folder to measure a cold compile.

On a CPU box shared with other jobs (load above the core count), use ``--threads 1``: with 2 OpenMP threads every
parallel op waits for a descheduled thread (measured: a 128K-element torch.dot took 4.8 ms with 2 threads,
7 us with 1), which swamps the step times and punishes whichever side issues more small ops.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "simigrad-bench-inductor-cache"))

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import simigrad_compile  # noqa: E402
from bench_common import hardware, summarise, versions  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FORMS = ("separate", "accumulate")
CLOCK = [time.perf_counter]
GOAL = 1.05


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())





def fxgraph_counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def flat_grads(model: nn.Module) -> torch.Tensor:
    """Every parameter's gradient, zeros where it has none (a parameter the loss does not reach, or a frozen one)."""
    return torch.cat([p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel()) for p in model.parameters()])


def step(compiled, model: nn.Module, idx: torch.Tensor, tgt: torch.Tensor, sync) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    sync()
    start = CLOCK[0]()
    loss = compiled(idx, tgt)
    loss.backward()
    sync()
    return CLOCK[0]() - start, loss.detach()


def paired(times: list, base: list) -> float:
    """Median of the per-repeat ratios (both ran in the same repeat, next to each other)."""
    return statistics.median(t / b for t, b in zip(times, base))


def read_stats(model: nn.Module, sync) -> tuple[float, simigrad_compile.SplitStats]:
    sync()
    start = CLOCK[0]()
    stats = simigrad_compile.gradient_stats(model, reset=True)
    return CLOCK[0]() - start, stats


def check(models: dict, losses: dict, stats: simigrad_compile.SplitStats, name: str) -> dict:
    """Same loss and gradients from both backends; simigrad statistics finite and adding up to |g|^2."""
    g_ind, g_sim = flat_grads(models["inductor"]), flat_grads(models[name])
    grad_err = ((g_sim - g_ind).norm() / g_ind.norm()).item()
    loss_err = abs(losses[name].item() - losses["inductor"].item()) / abs(losses["inductor"].item())
    g2 = float(g_sim.double().pow(2).sum())
    halves = stats.sq_norm_1 + stats.sq_norm_2 + 2 * stats.dot
    result = {
        "loss": losses["inductor"].item(), "loss_rel_err": loss_err, "grad_rel_err": grad_err,
        "stats": {"dot": stats.dot, "sq_norm_1": stats.sq_norm_1, "sq_norm_2": stats.sq_norm_2,
                  "cosine": stats.cosine, "mode": stats.mode},
        "halves_sum_rel_err": abs(halves - g2) / g2, "missing": list(stats.missing), "unsplit": dict(stats.unsplit),
    }
    problems = []
    if not loss_err < 1e-5:
        problems.append(f"loss differs: rel err {loss_err:.2e}")
    if not grad_err < 1e-4:
        problems.append(f"gradients differ: rel err {grad_err:.2e}")
    if not stats.finite:
        problems.append(f"statistics not finite: {stats}")
    if stats.mode != "batch":
        problems.append(f"statistics mode {stats.mode!r}, expected 'batch'")
    if stats.missing:
        problems.append(f"parameters without statistics: {stats.missing}")
    if not result["halves_sum_rel_err"] < 1e-3:
        problems.append(f"a + b + 2d = {halves:.6g} but |g|^2 = {g2:.6g}")
    if problems:
        raise AssertionError(f"sanity check of {name} failed: " + "; ".join(problems))
    return result


def profile(compiled: dict, models: dict, idx, tgt, device: str, rows: int = 15) -> dict:
    """Self time per op of one step of each model (after warm-up), and the ops that differ most."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    tables = {}
    for name in compiled:
        for _ in range(2):
            step(compiled[name], models[name], idx, tgt, sync)
        with tprofile(activities=activities) as prof:
            for _ in range(3):
                step(compiled[name], models[name], idx, tgt, sync)
        if name != "inductor":
            simigrad_compile.gradient_stats(models[name], reset=True)
        tables[name] = {e.key: getattr(e, key) / 3 / 1e3 for e in prof.key_averages()}  # ms per step
        print(f"\n-- profile {name}: top {rows} ops by self time (ms per step)")
        for op, ms in sorted(tables[name].items(), key=lambda kv: -kv[1])[:rows]:
            print(f"   {ms:9.3f}  {op}")
    tops = {}
    for name in [n for n in compiled if n != "inductor"]:
        ops = set(tables["inductor"]) | set(tables[name])
        diff = {op: tables[name].get(op, 0.0) - tables["inductor"].get(op, 0.0) for op in ops}
        tops[name] = dict(sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:rows])
        print(f"\n-- profile {name} - inductor: top {rows} differences (ms per step)")
        for op, ms in tops[name].items():
            print(f"   {ms:+9.3f}  {op}")
    return {"ms_per_step": tables, "top_differences_ms": tops}


def run_point(args, batch: int, seq: int, sync) -> dict:
    device = args.device
    torch.manual_seed(0)
    heads = args.heads or max(1, args.d_model // 64)
    base = GPT(args.vocab, args.d_model, args.layers, heads, seq)
    n_params = sum(p.numel() for p in base.parameters())
    options = {"inductor": None, **{f"simigrad:{f}": {"split_contraction": f} for f in args.forms}}
    models = {name: copy.deepcopy(base).to(device) for name in options}
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (batch, seq), generator=gen).to(device)
    tgt = torch.randint(0, args.vocab, (batch, seq), generator=gen).to(device)

    torch._dynamo.reset()
    compiled, compile_info, losses = {}, {}, {}
    for name, opts in options.items():
        compiled[name] = torch.compile(models[name], backend=name.split(":")[0], dynamic=False, options=opts)
        hit0, miss0 = fxgraph_counters()
        seconds, losses[name] = step(compiled[name], models[name], idx, tgt, sync)
        hit1, miss1 = fxgraph_counters()
        compile_info[name] = {"first_step_s": seconds, "fxgraph_cache_hits": hit1 - hit0,
                              "fxgraph_cache_misses": miss1 - miss0}
    sims = [name for name in options if name != "inductor"]
    sanity = {name: check(models, losses, read_stats(models[name], sync)[1], name) for name in sims}

    for _ in range(args.warmup):
        for name in options:
            step(compiled[name], models[name], idx, tgt, sync)
    for name in sims:
        simigrad_compile.gradient_stats(models[name], reset=True)

    names = list(options)
    times = {name: [] for name in names}
    reads, with_read = {name: [] for name in sims}, {name: [] for name in sims}
    for r in range(args.repeats):
        k = r % len(names)
        for name in (names[k:] + names[:k])[:: 1 if r % 2 == 0 else -1]:
            seconds, _ = step(compiled[name], models[name], idx, tgt, sync)
            times[name].append(seconds)
            if name != "inductor":
                read_s, stats = read_stats(models[name], sync)
                if not stats.finite:
                    raise AssertionError(f"statistics of {name} not finite at repeat {r}: {stats}")
                reads[name].append(read_s)
                with_read[name].append(seconds + read_s)

    steps = {name: summarise(t) for name, t in times.items()}
    ind = steps["inductor"]
    forms = {name.split(":")[1]: {
        "ratio": steps[name]["median_s"] / ind["median_s"], "ratio_min": steps[name]["min_s"] / ind["min_s"],
        "ratio_paired": paired(times[name], times["inductor"]),
        "ratio_with_read": statistics.median(with_read[name]) / ind["median_s"],
        "stats_read": summarise(reads[name]), "step_plus_read": summarise(with_read[name]), "sanity": sanity[name],
    } for name in sims}
    row = {
        "batch": batch, "seq": seq, "tokens": batch * seq, "params": n_params, "heads": heads,
        "compile": compile_info, "step": steps, "forms": forms, "ratio": forms[args.forms[0]]["ratio"],
        "tokens_per_s": {name: batch * seq / s["median_s"] for name, s in steps.items()},
        "times_s": times, "stats_read_times_s": reads,
    }
    if len(sims) == 2:
        row["paired_ratio_of_forms"] = {f"{sims[1]}/{sims[0]}": paired(times[sims[1]], times[sims[0]])}
    for form in forms:
        print(format_row(row, form), flush=True)
    for pair, value in row.get("paired_ratio_of_forms", {}).items():
        print(f"   median over repeats of {pair}: {value:.3f}", flush=True)
    if args.profile:
        row["profile"] = profile(compiled, models, idx, tgt, device)
    return row


HEADER = (f"{'batch':>5}{'seq':>5}{'params':>9}{'form':>11}{'compile ind/sim s':>19}"
          f"{'inductor ms (min-max)':>25}{'simigrad ms (min-max)':>25}{'ratio [min] {paired}':>22}"
          f"{'read ms':>9}{'+read':>7}{'grad err':>10}{'cos':>8}")


def format_row(r: dict, form: str) -> str:
    s, c, f, sim = r["step"], r["compile"], r["forms"][form], f"simigrad:{form}"

    def ms(k):
        return f"{s[k]['median_s'] * 1e3:.1f} ({s[k]['min_s'] * 1e3:.1f}-{s[k]['max_s'] * 1e3:.1f})"

    compile_s = f"{c['inductor']['first_step_s']:.1f}/{c[sim]['first_step_s']:.1f}"
    flag = "" if f["ratio"] <= GOAL else "  > goal"
    return (f"{r['batch']:>5}{r['seq']:>5}{r['params'] / 1e6:>8.2f}M{form:>11}{compile_s:>19}{ms('inductor'):>25}"
            f"{ms(sim):>25}{f['ratio']:>7.3f} [{f['ratio_min']:.3f}] {{{f['ratio_paired']:.3f}}}"
            f"{f['stats_read']['median_s'] * 1e3:>9.2f}{f['ratio_with_read']:>7.3f}"
            f"{f['sanity']['grad_rel_err']:>10.1e}{f['sanity']['stats']['cosine']:>8.3f}{flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="4", help="batch size, or a comma-separated sweep")
    parser.add_argument("--seq", default="128", help="sequence length, or a comma-separated sweep")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=None, help="default: d_model // 64")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model after the compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops of each model")
    parser.add_argument("--split-contraction", dest="forms", default=",".join(FORMS),
                        help="comma-separated split_contraction forms, one simigrad model each (first: 'ratio')")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time.process_time (with --threads 1, the time the step ran, not the time it waited "
                             "for a core on an oversubscribed box)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/step_<device>.json)")
    args = parser.parse_args()
    args.forms = [f for f in args.forms.split(",") if f]
    if not args.forms or set(args.forms) - set(FORMS):
        parser.error(f"--split-contraction: a comma-separated list of {', '.join(FORMS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["inductor_cache_dir"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    info = hardware(args.device)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cache {config['inductor_cache_dir']}")
    print(HEADER)
    rows = [run_point(args, int(b), int(t), sync) for b in args.batch.split(",") for t in args.seq.split(",")]
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = os.getloadavg()
    result = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "hardware": info,
              "versions": versions(), "config": config, "goal_ratio": GOAL, "rows": rows}
    out = args.out or RESULTS / f"step_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
