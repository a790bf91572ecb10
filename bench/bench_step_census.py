"""Step time, first-step (compile) time and peak step memory of ``backend="simigrad"`` against plain Inductor,
over a slice of the coverage census's models.

    OMP_NUM_THREADS=1 nice python bench/bench_step_census.py                # every model, bench/results/step_census.json
    python bench/bench_step_census.py --only 'gpt2|bert' --repeats 11       # a few models (regular expression on labels)
    python bench/bench_step_census.py --only lr-aspp --profile --json /tmp/p.json  # + per-kernel profile
    python bench/bench_step_census_table.py                                 # the docs table from the JSON

The models are the census's own builders (``bench_coverage_models``: random weights, small configs, no download)
in fp32, plus LR-ASPP (torchvision's segmentation model, per-pixel cross-entropy). Each model runs in its own
subprocess, at 1 thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), one model at a time:

  first step  plain Inductor, then simigrad, each compiled on cold caches (an empty ``TORCHINDUCTOR_CACHE_DIR``
              and Inductor's in-memory kernel caches cleared; one tiny compile beforehand pays Inductor's
              imports): the wall time of the first forward+backward (Dynamo + AOT + the split pass + Inductor,
              whose C++ compiles run in worker processes) and the process's own CPU time in it;
  memory      after 2 more steps, one step under ``torch.profiler(profile_memory=True)``: torch's CPU allocator
              reports every tensor allocation and free (``[memory]`` events), and the peak of their running sum
              is the step's peak above its start. Parameters, buffers and inputs (the same for both) are added to
              give ``peak_bytes``. ``held_after_step_bytes`` is what the step allocated and did not free (the
              gradients, and any buffer kept). Allocations outside torch's allocator (oneDNN/MKL scratch) are not
              seen, for either backend. tracemalloc would see none of torch's allocations, and RSS is dominated by
              the compiler's own memory at these sizes;
  steady step after warm-up, each repeat runs both models, the order alternating (``bench_step.py``'s
              protocol), timed by the process's CPU time (``time.process_time`` at 1 thread: the time the step
              ran, not the time it waited for a core). The first step's gradients and the simigrad statistics are
              checked against the plain model (``bench_step.check``); a failed check is recorded, not fatal.

Reported per model: medians, the ratio simigrad/inductor of the medians and the median per-repeat ratio, first-step
seconds of each, peak memory of each and their ratio, the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
GOAL_STEP, GOAL_MEMORY = 1.03, 1.05

# label -> (census spec name, batch); "lraspp" is built here (segmentation is not in the census)
MODELS = {
    "GPT-2": ("hf_gpt2", 8), "BERT (padded)": ("hf_bert_padded", 8), "Llama": ("hf_llama_labels", 8),
    "T5": ("hf_t5", 8), "ViT": ("hf_vit", 8), "Whisper": ("hf_whisper", 8),
    "ResNet-50": ("resnet50", 8), "ConvNeXt-T": ("convnext_tiny", 8), "MobileNetV3": ("mobilenet_v3_small", 8),
    "EfficientNet-B0": ("efficientnet_b0", 8), "LR-ASPP": ("lraspp", 8),
    "Swin-T": ("timm_swin_tiny_patch4_window7_224", 8),
}


def _lraspp(b: int):
    import torch
    import torch.nn.functional as F
    import torchvision

    import bench_coverage_models as cm

    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=cm.CLASSES)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(b, 3, 64, 64, generator=g), "y": torch.randint(0, cm.CLASSES, (b, 64, 64), generator=g)}

    def loss_of(m, batch):  # every sample has as many pixels: the pixel mean is a mean of the samples' means
        return F.cross_entropy(m(batch["x"])["out"], batch["y"])

    return cm.no_dropout(model), batch, loss_of


def build(spec_name: str, b: int):
    """``(model, batch, loss_of)`` in fp32, training mode, seeded."""
    import bench_torchvision_cpu

    bench_torchvision_cpu.ensure_importable()
    import torch

    import bench_coverage_models as cm

    torch.manual_seed(0)
    if spec_name == "lraspp":
        model, batch, loss_of = _lraspp(b)
    else:
        model, batch, loss_of = next(s for s in cm.all_specs() if s.name == spec_name).build(b)
    return model.float().train(), batch, loss_of


def _stepper(compiled, batch, loss_of):
    """``bench_step.step`` calls ``compiled(idx, tgt)``: the census's batches go through ``loss_of``."""
    return lambda *_: loss_of(compiled, batch)


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def step_memory(fn, model, sync) -> dict:
    """Peak of the running sum of the CPU allocator's allocations during one step, and what the step left held."""
    from torch.profiler import ProfilerActivity, profile

    import bench_step

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bench_step.step(fn, model, None, None, sync)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return {"peak_above_start_bytes": peak, "held_after_step_bytes": live, "allocator_events": len(events)}


def warm_imports() -> None:
    """One tiny Inductor compile with a backward, so that neither measured first step pays Inductor's imports."""
    import torch

    x = torch.randn(4, requires_grad=True)
    torch.compile(lambda t: (t.sin() * 2).sum(), backend="inductor")(x).backward()


def fresh_caches(folder: str) -> None:
    """An empty on-disk Inductor cache and empty in-memory kernel caches: the next compile is a cold one."""
    from torch._inductor.utils import clear_inductor_caches

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cache-", dir=folder)
    clear_inductor_caches()


def first_step(model, batch, loss_of, backend: str, sync) -> tuple:
    """Compile ``model`` with ``backend`` on cold caches; time its first step; measure a later step's memory."""
    import torch

    import bench_step

    compiled = torch.compile(model, backend=backend, dynamic=False)
    fn = _stepper(compiled, batch, loss_of)
    hit0, miss0 = bench_step.fxgraph_counters()
    t, c = time.perf_counter(), time.process_time()
    _, loss = bench_step.step(fn, model, None, None, sync)
    rec = {"first_step_s": time.perf_counter() - t, "first_step_cpu_s": time.process_time() - c}
    hit1, miss1 = bench_step.fxgraph_counters()
    rec.update(fxgraph_cache_hits=hit1 - hit0, fxgraph_cache_misses=miss1 - miss0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for _ in range(2):
        bench_step.step(fn, model, None, None, sync)
    if backend == "simigrad":
        import simigrad_compile

        simigrad_compile.gradient_stats(model, reset=True)
    rec.update(step_memory(fn, model, sync))
    params = list(model.parameters())
    rec["base_bytes"] = _bytes(params + list(model.buffers()) + [v for v in batch.values()])
    rec["grad_bytes"] = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    rec["peak_bytes"] = rec["base_bytes"] + rec["peak_above_start_bytes"]
    rec["params"] = sum(p.numel() for p in params)
    return rec, fn, loss, grads


def model_worker(spec_name: str, b: int, repeats: int, warmup: int, folder: str, profile: bool = False) -> dict:
    """Both backends' first steps and memory (each compile cold), then the interleaved steady steps."""
    import torch

    import bench_step
    import simigrad_compile
    from bench_common import summarise

    torch.set_num_threads(1)
    sync = lambda: None  # noqa: E731
    if profile:  # each Inductor C++ kernel a profiler range of its own (only with --profile: it costs time)
        torch._inductor.config.cpp.enable_kernel_profile = True
    warm_imports()
    base, batch, loss_of = build(spec_name, b)
    models = {name: copy.deepcopy(base) for name in ("inductor", "simigrad")}
    rec: dict = {}
    fns, losses = {}, {}
    for name, model in models.items():
        fresh_caches(folder)
        rec[name], fns[name], losses[name], grads = first_step(model, batch, loss_of, name, sync)
        for n, p in model.named_parameters():  # the first step's gradients, for the check below
            p.grad = grads.get(n)
    try:
        stats = simigrad_compile.gradient_stats(models["simigrad"], reset=True)  # of the memory step
        rec["sanity"] = bench_step.check(models, losses, stats, "simigrad")
    except AssertionError as e:  # recorded, not fatal: a timing of a wrong step is still shown, with the reason
        rec["sanity_problem"] = str(e)
    bench_step.CLOCK[0] = time.process_time
    for _ in range(warmup):
        for name in models:
            bench_step.step(fns[name], models[name], None, None, sync)
    simigrad_compile.gradient_stats(models["simigrad"], reset=True)
    names, times = list(models), {name: [] for name in models}
    for r in range(repeats):
        for name in names[:: 1 if r % 2 == 0 else -1]:
            seconds, _ = bench_step.step(fns[name], models[name], None, None, sync)
            times[name].append(seconds)
        stats = simigrad_compile.gradient_stats(models["simigrad"], reset=True)
    rec["stats_mode"], rec["unsplit"] = stats.mode, dict(stats.unsplit)
    rec["step"] = {name: summarise(t) for name, t in times.items()}
    rec["ratio"] = rec["step"]["simigrad"]["median_s"] / rec["step"]["inductor"]["median_s"]
    rec["ratio_paired"] = bench_step.paired(times["simigrad"], times["inductor"])
    rec["times_s"] = times
    if profile:
        rec["profile"] = kernel_profile(fns, models, sync)
    return rec


def kernel_profile(fns: dict, models: dict, sync, steps: int = 9, rows: int = 40) -> dict:
    """Per op (Inductor kernels included, as their own ranges): calls per step and the least self time over
    ``steps`` separately profiled steps (the least: robust to the step being descheduled on a loaded box)."""
    from torch.profiler import ProfilerActivity, profile

    import bench_step

    per: dict = {}
    for name, fn in fns.items():
        ops: dict = {}
        for _ in range(steps):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                bench_step.step(fn, models[name], None, None, sync)
            for e in prof.key_averages():
                count, best = ops.get(e.key, (e.count, float("inf")))
                ops[e.key] = (count, min(best, e.self_cpu_time_total / 1e3))
        if name == "simigrad":
            import simigrad_compile

            simigrad_compile.gradient_stats(models[name], reset=True)
        per[name] = {op: {"calls": c, "min_self_ms": t} for op, (c, t) in ops.items()}
    keys = set(per["inductor"]) | set(per["simigrad"])
    none = {"calls": 0, "min_self_ms": 0.0}
    diff = {op: {"calls": per["simigrad"].get(op, none)["calls"] - per["inductor"].get(op, none)["calls"],
                 "ms": per["simigrad"].get(op, none)["min_self_ms"] - per["inductor"].get(op, none)["min_self_ms"]}
            for op in keys}
    top = dict(sorted(diff.items(), key=lambda kv: -abs(kv[1]["ms"]))[:rows])
    totals = {name: sum(v["min_self_ms"] for v in ops.values()) for name, ops in per.items()}
    by_kind = {name: {} for name in per}
    for name, ops in per.items():
        for op, v in ops.items():
            kind = by_kind[name].setdefault(op_kind(op), {"calls": 0, "min_self_ms": 0.0})
            kind["calls"] += v["calls"]
            kind["min_self_ms"] += v["min_self_ms"]
    return {"per_op": per, "top_differences": top, "sum_min_self_ms": totals, "by_kind": by_kind}


KINDS = (("Inductor kernels", ("graph_", "cpp_fused", "triton_")), ("compiled-graph wrapper", ("## Call",)),
         ("convolution", ("aten::convolution", "aten::mkldnn_convolution", "aten::_convolution", "aten::conv")),
         ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
         ("statistics op", ("simigrad::",)), ("other aten ops", ("aten::",)))


def op_kind(op: str) -> str:
    """The residual's categories: the profiler key's kind by its prefix (the first of ``KINDS`` that matches)."""
    return next((kind for kind, prefixes in KINDS if op.startswith(prefixes)), "Python around the graphs")


def _worker(args) -> None:
    spec_name, b = MODELS[args.worker]
    folder = tempfile.mkdtemp(prefix="simigrad-step-census-")
    try:
        rec = model_worker(spec_name, b, args.repeats, args.warmup, folder, args.profile)
    except Exception as e:  # noqa: BLE001 -- a crash is a census result, recorded with its traceback
        rec = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(rec, f, default=str)


def _run(label: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TORCHVISION_WARN_WHEN_EXTENSION_LOADING_FAILS": ""}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", label, "--out", out,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)] + (["--profile"] if args.profile else [])
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        try:
            with open(out) as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            rec = {"error": f"worker died (exit {proc.returncode}): {proc.stderr[-1500:]}"}
    except subprocess.TimeoutExpired:
        rec = {"error": f"timeout after {args.timeout:.0f} s"}
    finally:
        if os.path.exists(out):
            os.unlink(out)
    rec["process_wall_s"] = time.perf_counter() - t
    return rec


def _commit() -> str:
    """The measured code: the checkout's commit, ``+changes`` when its tracked files (results aside) differ."""
    def git(*a):
        return subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True).stdout.strip()
    changed = git("status", "--porcelain", "-uno", "--", ":/", ":!/bench/results")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")


def measure(label: str, args) -> dict:
    row: dict = {"model": label, "census_spec": MODELS[label][0], "batch": MODELS[label][1],
                 "loadavg_before": os.getloadavg(), "code": _commit()}
    timing = _run(label, args)
    row["inductor"], row["simigrad"] = timing.pop("inductor", {}), timing.pop("simigrad", {})
    row["timing"] = timing
    row["loadavg_after"] = os.getloadavg()
    ind, sim = row["inductor"], row["simigrad"]
    if "peak_bytes" in ind and "peak_bytes" in sim:
        row["memory_ratio"] = sim["peak_bytes"] / ind["peak_bytes"]
        row["memory_goal_bytes"] = GOAL_MEMORY * ind["peak_bytes"] + ind["grad_bytes"]
        row["memory_within_goal"] = sim["peak_bytes"] <= row["memory_goal_bytes"]
    if "first_step_s" in ind and "first_step_s" in sim:
        row["first_step_ratio"] = sim["first_step_s"] / ind["first_step_s"]
    return row


def summary_line(row: dict) -> str:
    t = row["timing"]
    if "ratio" not in t:
        return f"{row['model']:<16} error: {(t.get('error') or row['inductor'].get('error') or '')[:200]}"
    s = t["step"]
    return (f"{row['model']:<16} step {s['inductor']['median_s'] * 1e3:8.2f} / {s['simigrad']['median_s'] * 1e3:8.2f} ms"
            f"  ratio {t['ratio']:.3f} (paired {t['ratio_paired']:.3f})"
            f"  first {row['inductor'].get('first_step_s', float('nan')):6.1f} / "
            f"{row['simigrad'].get('first_step_s', float('nan')):6.1f} s"
            f"  memory x{row.get('memory_ratio', float('nan')):.3f}  load {row['loadavg_before'][0]:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="regular expression on the model labels")
    p.add_argument("--repeats", type=int, default=21, help="interleaved timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds per subprocess")
    p.add_argument("--profile", action="store_true",
                   help="+ per-kernel profile of one step of each (Inductor kernel ranges on; timings then differ)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of --json's models that this run does not measure (to finish a cut-short run)")
    p.add_argument("--json", default=os.path.join(RESULTS, "step_census.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    if args.worker:
        _worker(args)
        return 0
    from bench_common import hardware, versions

    labels = [m for m in MODELS if not args.only or re.search(args.only, m, re.IGNORECASE)]
    start, t0 = datetime.datetime.now(datetime.timezone.utc).isoformat(), time.perf_counter()
    rows: list = []
    kept: list = []
    if args.append and os.path.exists(args.json):
        with open(args.json) as f:
            kept = [r for r in json.load(f)["models"] if r["model"] not in labels]

    def save(done: bool) -> None:  # after every model: an interrupted run keeps what it measured
        with open(args.json, "w") as f:
            json.dump({"timestamp": start, "complete": done, "command": " ".join(["python"] + sys.argv),
                       "config": {"repeats": args.repeats, "warmup": args.warmup, "threads": 1, "clock": "cpu"},
                       "goal_step_ratio": GOAL_STEP, "goal_memory_ratio": GOAL_MEMORY,
                       "hardware": hardware("cpu"), "versions": versions(), "wall_s": time.perf_counter() - t0,
                       "models": sorted(kept + rows, key=lambda r: list(MODELS).index(r["model"]))},
                      f, indent=1, default=str)

    for label in labels:
        rows.append(measure(label, args))
        print(summary_line(rows[-1]), flush=True)
        save(False)
    save({r["model"] for r in kept + rows} == set(MODELS))  # complete: every model of MODELS in the file
    print(f"saved {args.json} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
