"""Compile cost as a user meets it: time to the first optimizer step and to a warm ladder, against plain Inductor.

    PYTHONPATH=. python bench/bench_compile_cost.py [--models gpt bert resnet] [--max-micro 16] [--json PATH]

For each model (the demo GPT, a tiny random-weight BERT from transformers, a hand-written ResNet-18-shaped
net: no torchvision here) and each compiler (``simigrad``: ``torch.compile(backend="simigrad")`` under
``AdaptiveBatching`` with the default ladder up to ``--max-micro``; ``inductor``: plain
``torch.compile(backend="inductor")`` at a fixed batch of ``--max-micro``; ``simigrad-symbolic``: ``simigrad``
with ``symbolic_batch=True``, one graph for every rung of 2 or more; ``inductor-symbolic``: plain Inductor with
the batch dim marked dynamic, the baseline that separates the cost of a symbolic batch from the split pass's),
three fresh processes, each timed
from just before ``torch.compile``:

* ``cold``: an empty ``TORCHINDUCTOR_CACHE_DIR``;
* ``warm``: the same directory again (Inductor's local caches hold every graph);
* ``loaded``: an empty directory, and ``load_compile_cache`` of the file the cold process saved with
  ``save_compile_cache`` (the portable cache: what another rank, node or restart sees).

``first_step_s``: to the end of the first optimizer step; ``warm_ladder_s``: to the end of ``run.warm_up``
over every rung (for plain Inductor, its one graph: the first step). ``step_ms``: the median of a few
forward+backward+step calls at the largest rung once everything is compiled. ``phases_s``: Dynamo's own
compile-phase timers summed over the process (``compat.compilation_time_metrics``), and
``split_pass_s``: the time in simigrad's joint-graph pass (the rewrite), so a slow ladder shows where it
spends. ``--min-batch`` is the run's ``min_batch_size`` (1: every rung reachable). Compile cost is what a fresh
process pays, so each measurement has its own process (not one process interleaving both); the two compilers'
processes alternate within each cache state. The JSON records every process
(``--append`` keeps the rows of the models not run now). Run it with ``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("gpt", "bert", "resnet")
COMPILERS = ("simigrad", "simigrad-symbolic", "inductor", "inductor-symbolic")
CACHES = ("cold", "warm", "loaded")


def _resnet():
    """ResNet-18's shape (a 3x3 stem, four stages of two basic blocks, BatchNorm, a global pool) at widths
    8-64 on 32x32 inputs."""
    import torch.nn as nn
    import torch.nn.functional as F

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))

    class ResNet(nn.Module):
        def __init__(self, widths=(8, 16, 32, 64), classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU())
            blocks, cin = [], widths[0]
            for i, w in enumerate(widths):
                blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
                cin = w
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x, y):
            return F.cross_entropy(self.fc(self.blocks(self.stem(x)).mean((2, 3))), y)

    return ResNet()


def build(name: str, samples: int):
    """(model, dataset, loss(compiled, batch))."""
    import torch

    torch.manual_seed(0)
    if name == "gpt":
        from simigrad_compile.demo.model import TinyGPT

        model = TinyGPT(dim=64, layers=2, heads=4, context=64)
        x, y = torch.randint(0, 256, (samples, 64)), torch.randint(0, 256, (samples, 64))
        return model, torch.utils.data.TensorDataset(x, y), lambda m, b: m(b[0], b[1])
    if name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=64, num_labels=3)
        config._attn_implementation = "eager"
        model = BertForSequenceClassification(config)
        x, y = torch.randint(0, 1000, (samples, 32)), torch.randint(0, 3, (samples,))
        return model, torch.utils.data.TensorDataset(x, y), lambda m, b: m(input_ids=b[0], labels=b[1]).loss
    if name == "resnet":
        x, y = torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,))
        return _resnet(), torch.utils.data.TensorDataset(x, y), lambda m, b: m(b[0], b[1])
    raise ValueError(f"unknown model {name!r}; one of {MODELS}")


def _time_split_pass() -> list:
    """Wrap the split pass manager's call; returns the list its durations go to."""
    from simigrad_compile.compile.passes.manager import SimigradPassManager

    spent, call = [], SimigradPassManager.__call__

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return call(self, *a, **k)
        finally:
            spent.append(time.perf_counter() - t)

    SimigradPassManager.__call__ = timed
    return spent


def _phases() -> dict:
    from simigrad_compile import compat

    return {k: round(sum(v), 3) for k, v in compat.compilation_time_metrics().items()}


def worker(name: str, compiler: str, cache: str, max_micro: int, artifacts: str, repeats: int,
           min_batch: int = 1) -> dict:
    t_import = time.perf_counter()
    import torch

    import simigrad_compile
    from simigrad_compile.runtime.compile_cache import compiled_graphs
    from simigrad_compile.runtime.data import mark_batch

    import_s = time.perf_counter() - t_import
    model, dataset, loss_of = build(name, 2 * max_micro)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if cache == "loaded":
        simigrad_compile.load_compile_cache(artifacts)
    split_pass = _time_split_pass()
    t0 = time.perf_counter()
    compiled = torch.compile(model, backend=compiler.split("-")[0])
    out = {"model": name, "compiler": compiler, "cache": cache, "import_s": import_s,
           "parameters": sum(p.numel() for p in model.parameters())}
    symbolic = compiler.endswith("-symbolic")
    if compiler.startswith("simigrad"):
        run = simigrad_compile.AdaptiveBatching(compiled, opt, batch_size=max_micro, max_micro_batch_size=max_micro,
                                                min_batch_size=min_batch, symbolic_batch=symbolic)
        for batch in run.dataloader(dataset):
            loss_of(compiled, batch).backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
            if run.optimizer.stepped:
                break
        out["first_step_s"] = time.perf_counter() - t0
        run.warm_up(lambda b: loss_of(compiled, b).backward(), dataset)
        out["warm_ladder_s"] = time.perf_counter() - t0
        out["rungs"] = list(run.ladder.rungs)
        out["first_step"] = {k: run.history[0][k] for k in ("micro_batch_size", "accumulation", "statistics")}
        step = run.inner
        run.close()
    else:
        batch = [mark_batch(0, None, symbolic)(t) for t in dataset[:max_micro]]
        loss_of(compiled, batch).backward()
        opt.step()
        opt.zero_grad()
        out["first_step_s"] = out["warm_ladder_s"] = time.perf_counter() - t0
        out["rungs"] = [max_micro]
        step = opt
    out["graphs_compiled"] = compiled_graphs()
    out["phases_s"], out["split_pass_s"] = _phases(), sum(split_pass)

    batch = [mark_batch(0, None, symbolic)(t.clone()) for t in dataset[:max_micro]]
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        loss_of(compiled, batch).backward()
        step.step()
        step.zero_grad()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    out["step_ms"] = 1e3 * sorted(times)[len(times) // 2]
    out["step_cpu_ms"] = 1e3 * sorted(cpu)[len(cpu) // 2]
    out["graphs_after_steps"] = compiled_graphs()
    if cache == "cold":
        saved = simigrad_compile.save_compile_cache(artifacts)
        out["artifacts_bytes"] = saved.size if saved else 0
    return out


def _table(rows) -> str:
    lines = ["| model | compiler | rungs | cache | first step (s) | warm ladder (s) | graphs compiled | step (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['compiler']} | {len(r['rungs'])} | {r['cache']} | "
                     f"{r['first_step_s']:.1f} | {r['warm_ladder_s']:.1f} | {r['graphs_compiled']} | "
                     f"{r['step_ms']:.1f} |")
    ratios = ["", "| model | compiler | cache | processes | warm ladder / inductor first step (same cache state, "
                  "medians) | step CPU / inductor's |", "| --- | --- | --- | --- | --- | --- |"]
    by: dict = {}
    for r in rows:
        by.setdefault((r["model"], r["compiler"], r["cache"]), []).append(r)
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    for (m, c, cache), rs in by.items():
        base = by.get((m, "inductor", cache))
        if c != "inductor" and base:
            ladder, step = (med(rs, k) / med(base, k) for k in ("warm_ladder_s", "step_cpu_ms"))
            ratios.append(f"| {m} | {c} | {cache} | {len(rs)} | {ladder:.2f} | {step:.2f} |")
    return "\n".join(lines + ratios)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--compilers", nargs="+", default=list(COMPILERS), choices=COMPILERS)
    p.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    p.add_argument("--max-micro", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="repeat every model's processes, interleaved (medians)")
    p.add_argument("--min-batch", type=int, default=1, help="the run's min_batch_size (1: every rung reachable)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "compile_cost.json"))
    p.add_argument("--append", action="store_true", help="keep the JSON's rows of other models")
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "COMPILER", "CACHE", "ARTIFACTS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        name, compiler, cache, artifacts = args.worker
        print(json.dumps(worker(name, compiler, cache, args.max_micro, artifacts, args.repeats, args.min_batch)))
        return 0
    rows, args.earlier_commands = [], []
    if args.append and os.path.exists(args.json):
        with open(args.json) as f:
            earlier = json.load(f)
        rows = [r for r in earlier["rows"] if r["model"] not in args.models]
        args.earlier_commands = earlier.get("earlier_commands", []) + [earlier["command"]]
    for name in (m for _ in range(args.rounds) for m in args.models):
        dirs = {c: tempfile.mkdtemp(prefix=f"simigrad-cost-{name}-{c}-") for c in args.compilers}
        for cache in args.caches:
            for compiler in args.compilers:
                inductor_dir = dirs[compiler] if cache != "loaded" else tempfile.mkdtemp(prefix="simigrad-cost-")
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir}
                env.pop("SIMIGRAD_COMPILE_CACHE", None)
                artifacts = os.path.join(dirs[compiler], "artifacts.bin")
                cmd = [sys.executable, __file__, "--max-micro", str(args.max_micro), "--repeats", str(args.repeats),
                       "--min-batch", str(args.min_batch), "--worker", name, compiler, cache, artifacts]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise RuntimeError(f"{name}/{compiler}/{cache} failed:\n{out.stderr[-3000:]}")
                rows.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), command=_command(argv)))
                r = rows[-1]
                print(f"{name:>7} {compiler:>17} {cache:>7}: first step {r['first_step_s']:6.1f} s, warm ladder "
                      f"{r['warm_ladder_s']:6.1f} s ({len(r['rungs'])} rungs), {r['graphs_compiled']} graphs "
                      f"compiled, split pass {r['split_pass_s']:.1f} s, step {r['step_ms']:.1f} ms", flush=True)
                _save(args, argv, rows)  # after every process: a run cut short keeps what it measured
    print(_table(rows))
    print("saved", args.json)
    return 0


def _command(argv) -> str:
    return " ".join(["PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_compile_cost.py", *(argv or sys.argv[1:])])


def _save(args, argv, rows) -> None:
    sys.path.insert(0, HERE)
    from bench_common import hardware, versions

    record = {"command": _command(argv), "earlier_commands": args.earlier_commands,
              "max_micro": args.max_micro, "rows": rows, "table": _table(rows), "hardware": hardware("cpu"),
              "versions": versions()}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
