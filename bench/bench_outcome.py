"""Does it pay? The demo's GPT at one sample budget, several seeds: fixed B0 against each controller (issue 17,
item 3, first workload only).

Every run trains on exactly ``--samples`` sequences (``limit_next_step``), with the demo's model, data, LR schedule
and defaults; the controller is chosen through ``SIMIGRAD_CONTROLLER``. Per run: final validation loss, optimizer
steps, average batch, wall time (compiles included, evaluations excluded), and the samples at the first evaluation
whose loss reaches the fixed-B0 run's final loss (evaluation granularity: ``samples / eval_points``). Mean and
spread over seeds go to stdout; everything to ``bench/results/outcome_<time>.json``.

    python bench/bench_outcome.py --samples 8192 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RUNS = ("fixed", "simigrad", "gns", "adascale")


def reach(curve, loss, rtol=1e-4):
    """Samples at the first evaluation with a validation loss <= ``loss * (1 + rtol)`` (``rtol``: run-to-run
    rounding of identical runs); None when never."""
    return next((s for s, v in curve if v <= loss * (1 + rtol)), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--eval-points", type=int, default=8)
    p.add_argument("--fixed-loss", type=float, default=None,
                   help="the fixed-B0 run's final loss, when --runs leaves 'fixed' out (for 'reached fixed')")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from simigrad_compile.demo.data import load_splits
    from simigrad_compile.demo.experiment import validation_batches
    from simigrad_compile.demo.settings import DemoSettings
    from simigrad_compile.demo.train import train_run

    s = DemoSettings(samples=args.samples, compiler=args.compiler, eval_points=args.eval_points, progress=False)
    train_set, val_set = load_splits(s.context)
    val = validation_batches(val_set, s.eval_sequences)
    rows = []
    for seed in args.seeds:
        fixed_loss = args.fixed_loss
        for kind in args.runs:
            os.environ["SIMIGRAD_CONTROLLER"] = "simigrad" if kind == "fixed" else kind
            top = s.batch_size if kind == "fixed" else s.max_batch_size
            r = train_run(f"{kind} seed {seed}", s, train_set, val, seed, s.batch_size, top)
            if kind == "fixed":
                fixed_loss = r.val_loss
            rows.append({
                "run": kind, "seed": seed, "val_loss": r.val_loss, "steps": r.steps, "samples": r.samples,
                "average_batch": r.average_batch, "wall_s": r.wall_s, "compile_s": r.compile_s,
                "samples_to_fixed_loss": reach(r.curve, fixed_loss) if fixed_loss is not None else None,
                "curve": r.curve,
                "batch": [h["batch_size"] for h in r.history],
                "lr_scale": [h["lr_scale"] for h in r.history],
                "gns": [h["gns"] for h in r.history], "gain": [h["gain"] for h in r.history],
            })
            print(f"{kind:9s} seed {seed}: val {r.val_loss:.4f}  steps {r.steps:5d}  avg batch {r.average_batch:7.1f}  "
                  f"wall {r.wall_s:6.1f} s", flush=True)
    os.environ.pop("SIMIGRAD_CONTROLLER", None)
    print(f"\n{args.samples} samples, seeds {args.seeds}, compiler {args.compiler} (mean +- stdev over seeds)")
    print(f"{'run':9s} {'val loss':>17s} {'steps':>13s} {'avg batch':>10s} {'wall s':>13s} {'reached fixed':>13s}")
    for kind in args.runs:
        mine = [r for r in rows if r["run"] == kind]

        def ms(key, fmt):
            v = [r[key] for r in mine]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{format(statistics.mean(v), fmt)} +- {format(sd, fmt)}"

        reached = sum(r["samples_to_fixed_loss"] is not None for r in mine)
        print(f"{kind:9s} {ms('val_loss', '.4f'):>17s} {ms('steps', '.0f'):>13s} "
              f"{statistics.mean(r['average_batch'] for r in mine):10.1f} {ms('wall_s', '.1f'):>13s} "
              f"{reached}/{len(mine):>11d}")
    out = Path(args.out or Path(__file__).parent / "results" / f"outcome_{time.strftime('%Y%m%dT%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": s.as_dict(), "argv": sys.argv[1:], "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
