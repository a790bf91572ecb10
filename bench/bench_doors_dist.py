"""Each door against its plain library on 2 and 4 processes (gloo on CPU): step time and bytes per rank.

    OMP_NUM_THREADS=1 python bench/bench_doors_dist.py                # table + bench/results/doors_dist.json
    OMP_NUM_THREADS=1 python bench/bench_doors_dist.py --worlds 2 --doors hf --repeats 5

Pairs (same MLP, data, per-rank micro-batch, accumulation and global batch ``world x micro x accumulation``; the
door's batch pinned, ``min_batch_size = max_batch_size = batch_size``, so both do the same work every step):

* ``hf``: ``SimigradTrainer`` / ``transformers.Trainer``, the Trainer's DDP under torchrun;
* ``lightning``: ``SimigradCallback`` / no callback, ``strategy="ddp"`` under torchrun;
* ``autoload``: ``SIMIGRAD=1`` / the same DDP script without it (``bench/bench_doors_autoload.py``);
* ``hand``: ``AdaptiveBatching`` on a DDP module / the plain DDP loop.

``hf``, ``lightning`` and ``hand`` run ours and plain in the same processes, fits alternating
(``bench/bench_doors_pairs.py``); ``autoload`` needs a launch per run (``SIMIGRAD=1`` acts at ``import torch``),
launches alternating. A step's time is the interval between two optimizer-step ends on the slowest rank (the
loader, the library's loop and the door included); a run's figure is the median over its timed steps after the
warm-up; the table shows the median over repeats, and the ratio ours / plain of those medians. Bytes per rank per
step: :class:`~simigrad_compile.distributed.traffic.Traffic` (ring formulas; the plain runs counted through the
stock Python ``allreduce_hook``). CPU ms/step: ``time.process_time`` over a step (every thread of a rank's
process), the median over the timed steps averaged over the ranks, then the median over repeats; it moves much
less with the machine's load than the wall time. The load average (1 minute) is sampled after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DOORS = ("hf", "lightning", "lightning_fsdp", "autoload", "hand")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TIMING = {"--steps": 20, "--warmup": 5, "--count-steps": 3, "--width": 256}
"""Options of this launcher that every worker takes too (the launcher passes them on)."""
LAUNCH = {"--repeats": 3, "--micro": 32, "--accumulation": 1}
"""Options that ``bench_doors_pairs.py`` takes too (the ``SIMIGRAD=1`` worker takes its batch as arguments)."""


def add_options(p: argparse.ArgumentParser, *tables: dict) -> None:
    for table in tables:
        for flag, default in table.items():
            p.add_argument(flag, type=int, default=default)


def passed_on(a, *tables: dict) -> list:
    """The command-line form of ``a``'s values of the options in ``tables``."""
    return [x for table in tables for flag in table for x in (flag, str(getattr(a, flag[2:].replace("-", "_"))))]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMIGRAD")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _run(cmd, env) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    subprocess.run([*cmd[:-1], out, *cmd[-1]], check=True, env=env)
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def in_process(door: str, world: int, a) -> dict:
    cmd = [*TORCHRUN, f"--nproc_per_node={world}", os.path.join(HERE, "bench_doors_pairs.py"), door,
           passed_on(a, TIMING, LAUNCH)]
    r = _run(cmd, _env())
    return {"door": door, "world": world, "runs_s": r["fit_median_s"], "cpu_s": r["fit_cpu_s"],
            "bytes_per_step": r["bytes_per_step"],
            "calls": r["calls"], "loadavg_1": [l[0] for l in r["loadavg_1_5_15"]], "params": r["params"]}


def autoload(world: int, a) -> dict:
    batch = world * a.micro * a.accumulation
    pinned = dict(SIMIGRAD="1", SIMIGRAD_BATCH_SIZE=str(batch), SIMIGRAD_MIN_BATCH_SIZE=str(batch),
                  SIMIGRAD_MAX_BATCH_SIZE=str(batch))
    runs = {"plain": [], "ours": []}
    for r in range(a.repeats):
        for name in (("plain", "ours") if r % 2 == 0 else ("ours", "plain")):
            cmd = [*TORCHRUN, f"--nproc_per_node={world}", os.path.join(HERE, "bench_doors_autoload.py"),
                   [str(a.micro), str(a.accumulation), *passed_on(a, TIMING)]]
            runs[name].append(_run(cmd, _env(**(pinned if name == "ours" else {}))))
    return {"door": "autoload", "world": world, "runs_s": {k: [x["median_s"] for x in v] for k, v in runs.items()},
            "cpu_s": {k: [x["cpu_s"] for x in v] for k, v in runs.items()},
            "bytes_per_step": {k: v[0]["bytes_per_step"] for k, v in runs.items()},
            "calls": {k: v[0]["calls"] for k, v in runs.items()},
            "loadavg_1": [x["loadavg_1_5_15"][0] for v in runs.values() for x in v]}


def summarise_row(row: dict) -> dict:
    med = {k: statistics.median(v) for k, v in row["runs_s"].items()}
    cpu = {k: statistics.median(v) for k, v in row["cpu_s"].items()}
    nbytes = {k: max(v) for k, v in row["bytes_per_step"].items()}
    return {**row, "median_s": med, "time_ratio": med["ours"] / med["plain"], "cpu_median_s": cpu,
            "cpu_ratio": cpu["ours"] / cpu["plain"],
            "paired_ratios": [o / p for o, p in zip(row["runs_s"]["ours"], row["runs_s"]["plain"])],
            "bytes_per_rank_max": nbytes, "bytes_ratio": nbytes["ours"] / nbytes["plain"] if nbytes["plain"] else None}


def table(rows) -> str:
    """Markdown: per-step ms, median (min-max) over repeats; bytes per rank per step, the busiest rank's."""
    lines = ["| door | N | plain ms/step | ours ms/step | ours / plain | CPU ms/step plain, ours | CPU ours / plain | "
             "plain B/rank/step | ours B/rank/step | load (1 min) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = r["bytes_per_rank_max"]
        ms = {k: f"{statistics.median(v) * 1e3:.2f} ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})"
              for k, v in r["runs_s"].items()}
        c = r["cpu_median_s"]
        plain_bytes = f"{b['plain']:,.0f}" if b["plain"] else "not counted"
        lines.append(f"| {r['door']} | {r['world']} | {ms['plain']} | {ms['ours']} | {r['time_ratio']:.2f} | "
                     f"{c['plain'] * 1e3:.2f}, {c['ours'] * 1e3:.2f} | {r['cpu_ratio']:.2f} | {plain_bytes} | "
                     f"{b['ours']:,.0f} | {min(r['loadavg_1']):.1f}-{max(r['loadavg_1']):.1f} |")
    return "\n".join(lines)


def main() -> None:
    from bench_common import hardware, versions

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--doors", nargs="+", default=list(DOORS), choices=DOORS)
    add_options(p, TIMING, LAUNCH)
    p.add_argument("--out", default=os.path.join(HERE, "results", "doors_dist.json"))
    p.add_argument("--render", action="store_true", help="print the table of --out again, run nothing")
    a = p.parse_args()
    if a.render:
        with open(a.out) as f:
            print(table(json.load(f)["rows"]))
        return
    start = os.getloadavg()
    rows = []
    for world in a.worlds:
        for door in a.doors:
            row = autoload(world, a) if door == "autoload" else in_process(door, world, a)
            rows.append(summarise_row(row))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    result = {"command": " ".join(["OMP_NUM_THREADS=1 python bench/bench_doors_dist.py", *sys.argv[1:]]),
              "hardware": hardware("cpu"), "versions": versions(), "backend": "gloo", "args": vars(a),
              "loadavg_before": start, "loadavg_after": os.getloadavg(), "rows": rows, "table": text}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
