"""Does it pay? Fixed B0 against each controller on two workloads, two sample budgets and several seeds (issue 17).

Workloads: the demo's GPT (``simigrad_compile.demo``: byte-level stdlib sources, its model, LR and schedule, at a
smaller size) and a small CNN on scikit-learn's ``load_digits`` images (``bench_outcome_cnn``), with and without
BatchNorm. Per workload, budget and seed, six runs on exactly the same number of samples:

- ``fixed``: B0 throughout (the ``simigrad`` controller with ``min_batch_size == max_batch_size``);
- ``simigrad``, ``gns``, ``adascale``: the controllers, B0 to the workload's ``max_batch``, library defaults;
- ``fixed@simigrad``, ``fixed@gns``: a fixed batch at that controller's average batch (same seed), rounded in log
  space to the ladder ``B0 * 2**k``. AdaScale's batch stays B0, so its "average" run would be ``fixed`` again.

Everything goes to one JSON file (rewritten after every run; ``--resume`` skips the runs it already holds);
``bench/bench_outcome_table.py`` renders the docs' table and plots from it.

    python bench/bench_outcome.py --compiler aot_eager --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.append(str(Path(__file__).parent))  # bench/ names all start with bench_: none shadows a package

CONTROLLERS = ("simigrad", "gns", "adascale")
ADAPTIVE = ("simigrad", "gns")
RUNS = ("fixed",) + CONTROLLERS + tuple(f"fixed@{c}" for c in ADAPTIVE)
DEFAULT_OUT = Path(__file__).parent / "results" / "outcome_runs.json"

# Sized so that the whole command takes about 45 minutes on the project's loaded 2-core machine (aot_eager).
GPT_SIZE = dict(dim=32, layers=1, heads=2, context=32, eval_sequences=256)
GPT_BUDGETS = {"short": 4096, "long": 12288}
CNN_BUDGETS = {"short": 2880, "long": 8640}  # 2 and 6 epochs of the 1,437 training images


def ladder_round(average: float, b0: int, top: int) -> int:
    """The ladder batch ``b0 * 2**k`` (within ``[b0, top]``) nearest ``average`` in log space."""
    k = round(math.log2(max(average, b0) / b0))
    return min(b0 * 2 ** max(k, 0), top)


def workloads(names):
    from bench_outcome_run import cnn_workload, gpt_workload

    make = {"gpt": lambda: gpt_workload(budgets=GPT_BUDGETS, **GPT_SIZE),
            "cnn_bn": lambda: cnn_workload(True, CNN_BUDGETS),
            "cnn": lambda: cnn_workload(False, CNN_BUDGETS)}
    return [make[n]() for n in names]


def describe(w) -> dict:
    return {"b0": w.b0, "max_batch": w.max_batch, "ladder": list(w.ladder), "lr": w.lr, "warmup": w.warmup,
            "budgets": w.budgets, "eval_points": w.eval_points, "train_size": len(w.train_set),
            "model": GPT_SIZE if w.name == "gpt" else {"batch_norm": w.name == "cnn_bn", "width": 16}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["gpt", "cnn_bn", "cnn"], choices=("gpt", "cnn_bn", "cnn"))
    p.add_argument("--budgets", nargs="+", default=["short", "long"], choices=("short", "long"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--compiler", default="aot_eager", choices=("inductor", "aot_eager"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--resume", action="store_true", help="keep the runs --out already holds; run only the others")
    args = p.parse_args(argv)

    import torch
    from simigrad_compile import config as sg_config
    from bench_outcome_run import train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = json.loads(out.read_text()) if args.resume and out.exists() else {"rows": []}
    done = {(r["workload"], r["budget_name"], r["seed"], r["run"]): r for r in data["rows"]}
    started = time.perf_counter()
    data.update(meta={
        "command": "python bench/bench_outcome.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "compiler": args.compiler, "threads": args.threads, "seeds": args.seeds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)", "torch": torch.__version__,
        "controller_defaults": {k: v for k, v in asdict(sg_config.SimigradConfig()).items()
                                if k in ("target_similarity", "ema", "noise_ema", "lr_scaling", "controller",
                                         "interval", "max_micro_batch_size")},
        "wall_s_this_invocation": None}, workloads=data.get("workloads", {}))

    def save():
        data["meta"]["wall_s_this_invocation"] = round(time.perf_counter() - started, 1)
        data["rows"] = list(done.values())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")

    for w in workloads(args.workloads):
        data["workloads"][w.name] = describe(w)
        for budget_name in args.budgets:
            budget = w.budgets[budget_name]
            for seed in args.seeds:
                for kind in RUNS:
                    key = (w.name, budget_name, seed, kind)
                    if key in done:
                        continue
                    if kind.startswith("fixed@"):
                        avg = done[(w.name, budget_name, seed, kind[6:])]["average_batch"]
                        batch = top = ladder_round(avg, w.b0, w.max_batch)
                        controller = "simigrad"
                    else:
                        batch, top = w.b0, (w.b0 if kind == "fixed" else w.max_batch)
                        controller = "simigrad" if kind == "fixed" else kind
                    r = train(w, budget, seed, controller, batch, top, args.compiler)
                    done[key] = {"workload": w.name, "budget_name": budget_name, "budget": budget, "seed": seed,
                                 "run": kind, "controller": controller, "batch_bounds": [batch, top],
                                 "average_batch": r.average_batch, **{k: v for k, v in asdict(r).items()}}
                    print(f"{w.name:6s} {budget_name:5s} seed {seed} {kind:15s} val {r.val_loss:.4f} "
                          f"acc {r.val_acc:.3f} steps {r.steps:5d} avg B {r.average_batch:6.1f} "
                          f"wall {r.wall_s:6.1f} s (compile {r.compile_s:4.1f}) "
                          f"[{time.perf_counter() - started:.0f} s]", flush=True)
                    save()
    save()
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
