"""The step-census table of docs/benchmarks.md, generated from bench/results/step_census.json.

Reads JSON only (no torch, no model libraries).

    python bench/bench_step_census_table.py            # rewrite the table between the markers of docs/benchmarks.md
    python bench/bench_step_census_table.py --check    # exit 1 if the committed table differs from the JSON
    python bench/bench_step_census_table.py --print    # print the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs_table import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "step_census.json"
PAGE = REPO / "docs" / "benchmarks.md"
START, END = "<!-- step-census:start (bench/bench_step_census_table.py) -->", "<!-- step-census:end -->"


def _kib(n: float) -> str:
    return f"{n / 1024:,.0f}"


def row(r: dict, goal_step: float) -> str:
    ind, sim, t = r.get("inductor", {}), r.get("simigrad", {}), r.get("timing", {})
    name = f"{r['model']} (`{r['census_spec']}`, batch {r['batch']})"
    if "ratio" not in t:
        error = (t.get("error") or ind.get("error") or sim.get("error") or "no result").splitlines()[0][:160]
        return f"| {name} | - | - | - | - | - | - | - | error: {error.replace('|', '/')} |"
    s = t["step"]
    ratio = f"{t['ratio']:.3f}" if t["ratio"] <= goal_step else f"**{t['ratio']:.3f}**"
    notes = [f"code {r['code']}"] if r.get("code") else []
    if t.get("sanity_problem"):
        notes.append(t["sanity_problem"].replace("|", "/")[:160])
    if t.get("stats_mode") not in (None, "batch"):
        notes.append(f"statistics mode {t['stats_mode']}")
    if t.get("unsplit"):
        notes.append(f"{len(t['unsplit'])} unsplit")
    if "memory_ratio" in r:
        memory = (f"{_kib(ind['peak_bytes'])} / {_kib(sim['peak_bytes'])} ({r['memory_ratio']:.3f}"
                  f"{'' if r['memory_within_goal'] else ', over goal'})")
        grads = _kib(ind["grad_bytes"])
    else:
        memory, grads = "-", "-"
    first = (f"{ind.get('first_step_s', float('nan')):.0f} / {sim.get('first_step_s', float('nan')):.0f}"
             f" ({r.get('first_step_ratio', float('nan')):.1f}x)")
    return (f"| {name} | {ind.get('params', 0) / 1e6:.2f}M | {s['inductor']['median_s'] * 1e3:.1f} | "
            f"{s['simigrad']['median_s'] * 1e3:.1f} | {ratio} ({t['ratio_paired']:.3f}) | {first} | {memory} | "
            f"{grads} | {r['loadavg_before'][0]:.1f}-{r['loadavg_after'][0]:.1f} | {'; '.join(notes)} |")


def table(result: dict) -> str:
    rows = result["models"]
    done = [r for r in rows if "ratio" in r.get("timing", {})]
    within = sum(1 for r in done if r["timing"]["ratio"] <= result["goal_step_ratio"])
    mem = sum(1 for r in done if r.get("memory_within_goal"))
    cfg = result["config"]
    lines = [f"`{result['command']}` ({result['timestamp'][:16]} UTC, {result['wall_s'] / 60:.0f} min, "
             f"torch {result['versions']['torch']}, {result['hardware']['cpu_count']} cores shared; "
             f"median of {cfg['repeats']} interleaved steps, CPU time at {cfg['threads']} thread). "
             f"{within} of {len(rows)} models within {result['goal_step_ratio']}x steady step; "
             f"{mem} of {len(rows)} within the memory goal "
             f"({result['goal_memory_ratio']}x plus one gradient-sized buffer)."
             + ("" if result["complete"] else " **The run was cut short: only the models below were measured.**"),
             "",
             "| model | params | inductor ms | simigrad ms | ratio (paired) | first step s, ind / sim | "
             "peak KiB, ind / sim (ratio) | grads KiB | load 1 min | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [row(r, result["goal_step_ratio"]) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    return cli(argv, __doc__.splitlines()[0], PAGE, START, END, lambda: table(json.loads(RESULT.read_text())),
               "bench/results/step_census.json")


if __name__ == "__main__":
    sys.exit(main())
