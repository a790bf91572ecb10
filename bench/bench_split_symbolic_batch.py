"""One graph with a symbolic batch (split at floor(B/2)) against the ladder: one static graph per micro-batch size.

    PYTHONPATH=. python bench/bench_split_symbolic_batch.py [--sizes 8 16 32 64] [--repeats 7] [--json PATH]

Each mode compiles a small transformer (backend="simigrad", Inductor) in a fresh process with a fresh Inductor
cache and warms every size up (the compile time is that warm-up), then times steps (forward+backward) size by
size. The two modes' processes alternate (``--rounds`` each, ABAB...); figures are medians over all rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(mode: str, sizes, repeats: int) -> dict:
    import torch

    sys.path.append(os.path.join(HERE, "..", "tests"))
    from simigrad_testkit.models import TinyGPT

    import simigrad_compile

    torch.manual_seed(0)
    model = TinyGPT(d=64, t=32, pos_embedding=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="simigrad", dynamic=(mode == "symbolic"))
    batches = {b: (torch.randint(0, 40, (b, 32)), torch.randint(0, 40, (b, 32))) for b in sizes}
    t = time.perf_counter()
    for b in sizes:
        if mode == "ladder":
            torch._dynamo.mark_static(batches[b][0], 0)
        compiled(*batches[b]).backward()
    compile_s = time.perf_counter() - t
    stats = simigrad_compile.gradient_stats(model, reset=True)
    steps = {b: [] for b in sizes}
    for _ in range(repeats):
        for b in sizes:
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            compiled(*batches[b]).backward()
            steps[b].append(time.perf_counter() - t)
            simigrad_compile.gradient_stats(model, reset=True)
    from torch._dynamo.utils import counters

    return {"mode": mode, "compile_s": compile_s, "graphs": counters["stats"]["unique_graphs"],
            "stats_mode": stats.mode, "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=os.path.join(HERE, "results", "split_symbolic_batch.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes, args.repeats)))
        return 0
    runs = {"ladder": [], "symbolic": []}
    for _ in range(args.rounds):
        for mode in runs:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="simigrad-bench-")}
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--repeats", str(args.repeats),
                                  "--sizes", *map(str, args.sizes)], capture_output=True, text=True, env=env, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    import statistics

    results = {mode: {"compile_s": statistics.median(r["compile_s"] for r in rs), "graphs": rs[0]["graphs"],
                      "stats_mode": rs[0]["stats_mode"],
                      "steps": {str(b): [t for r in rs for t in r["steps"][str(b)]] for b in args.sizes}}
               for mode, rs in runs.items()}

    sys.path.insert(0, HERE)
    from bench_common import hardware, versions

    print(f"{'':>10} {'ladder':>10} {'symbolic':>10} {'ratio':>7}")
    l, s = results["ladder"], results["symbolic"]
    print(f"{'compile s':>10} {l['compile_s']:>10.1f} {s['compile_s']:>10.1f} {s['compile_s'] / l['compile_s']:>7.2f}"
          f"   graphs {l['graphs']} vs {s['graphs']}, statistics {l['stats_mode']} / {s['stats_mode']}")
    rows = {}
    for b in args.sizes:
        ml, ms = statistics.median(l["steps"][str(b)]), statistics.median(s["steps"][str(b)])
        rows[b] = {"ladder_ms": 1e3 * ml, "symbolic_ms": 1e3 * ms, "ratio": ms / ml}
        print(f"{'B=' + str(b):>10} {1e3 * ml:>8.1f}ms {1e3 * ms:>8.1f}ms {ms / ml:>7.2f}")
    record = {"runs": runs, "compile_s": {m: r["compile_s"] for m, r in results.items()}, "step_medians": rows, "hardware": hardware("cpu"), "versions": versions()}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print("saved", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
