"""One graph with a symbolic batch dim (``symbolic_batch=True``; split at floor(B/2)) against the ladder (one static graph per micro-batch size),
and both against plain Inductor's one compile at the largest size.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_split_symbolic_batch.py [--sizes 8 16 32 64] [--repeats 7]

Each mode compiles a small transformer in a fresh process with a fresh Inductor cache and warms its sizes up (the
compile time is that warm-up, wall clock), then times steps (forward+backward, CPU time of the process, which a
busy machine disturbs less than wall time) size by size: ``ladder`` and ``symbolic`` use backend="simigrad" at
every size, ``plain`` is ``backend="inductor"`` at the largest size only. The modes' processes alternate
(``--rounds`` each); figures are medians over all rounds.
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
    from simigrad_compile.runtime.data import mark_batch

    backend = "inductor" if mode == "plain" else "simigrad"
    compiled = torch.compile(model, backend=backend)
    sizes = sizes[-1:] if mode == "plain" else sizes
    mark = mark_batch(0, None, symbolic=(mode == "symbolic"))  # what the loader does, as symbolic_batch sets
    batches = {b: (mark(torch.randint(0, 40, (b, 32))), mark(torch.randint(0, 40, (b, 32)))) for b in sizes}
    t = time.perf_counter()
    for b in sizes:
        compiled(*batches[b]).backward()
    compile_s = time.perf_counter() - t
    stats = simigrad_compile.gradient_stats(model, reset=True)
    steps = {b: [] for b in sizes}
    for _ in range(repeats):
        for b in sizes:
            model.zero_grad(set_to_none=True)
            t = time.process_time()
            compiled(*batches[b]).backward()
            steps[b].append(time.process_time() - t)
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
    runs = {"ladder": [], "symbolic": [], "plain": []}
    for _ in range(args.rounds):
        for mode in runs:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="simigrad-bench-")}
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--repeats", str(args.repeats),
                                  "--sizes", *map(str, args.sizes)], capture_output=True, text=True, env=env, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    import statistics

    results = {mode: {"compile_s": statistics.median(r["compile_s"] for r in rs), "graphs": rs[0]["graphs"],
                      "stats_mode": rs[0]["stats_mode"],
                      "steps": {b: [t for r in rs for t in r["steps"][b]] for b in rs[0]["steps"]}}
               for mode, rs in runs.items()}

    sys.path.insert(0, HERE)
    from bench_common import hardware, versions

    l, s, p0 = results["ladder"], results["symbolic"], results["plain"]
    print(f"{'':>10} {'ladder':>10} {'symbolic':>10} {'sym/lad':>8} {'plain':>10}")
    print(f"{'compile s':>10} {l['compile_s']:>10.1f} {s['compile_s']:>10.1f} {s['compile_s'] / l['compile_s']:>8.2f}"
          f" {p0['compile_s']:>10.1f}   graphs {l['graphs']} / {s['graphs']} / {p0['graphs']},"
          f" statistics {l['stats_mode']} / {s['stats_mode']}")
    rows = {}
    for b in args.sizes:
        ml, ms = statistics.median(l["steps"][str(b)]), statistics.median(s["steps"][str(b)])
        mp = statistics.median(p0["steps"][str(b)]) if str(b) in p0["steps"] else None
        rows[b] = {"ladder_ms": 1e3 * ml, "symbolic_ms": 1e3 * ms, "ratio": ms / ml,
                   "plain_ms": None if mp is None else 1e3 * mp}
        plain = "" if mp is None else f" {1e3 * mp:>8.1f}ms"
        print(f"{'B=' + str(b):>10} {1e3 * ml:>8.1f}ms {1e3 * ms:>8.1f}ms {ms / ml:>8.2f}{plain}")
    record = {"command": "python " + " ".join(sys.argv), "load_average": os.getloadavg(), "runs": runs,
              "compile_s": {m: r["compile_s"] for m, r in results.items()}, "step_medians": rows,
              "hardware": hardware("cpu"), "versions": versions()}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print("saved", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
