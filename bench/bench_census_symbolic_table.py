"""The census under ``symbolic_batch`` beside the static census, model by model, in docs/census.md.

Reads ``coverage-aot_eager-full-symbolic.json`` (``bench_coverage.py --symbolic``) and the static census rows of
``bench_census_table.load_rows`` (JSON only: no torch, no model libraries). A model whose outcome differs between
the two is listed with both reasons; the others are counted.

    python bench/bench_census_symbolic_table.py            # rewrite the table between the markers of docs/census.md
    python bench/bench_census_symbolic_table.py --check    # exit 1 if the committed table differs from the JSON
    python bench/bench_census_symbolic_table.py --print    # print the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_census_table import PAGE, RESULTS, load_rows, why  # noqa: E402
from bench_docs_table import cli  # noqa: E402

SYMBOLIC = "coverage-aot_eager-full-symbolic.json"
START, END = "<!-- census-symbolic:start (bench/bench_census_symbolic_table.py) -->", "<!-- census-symbolic:end -->"


def table() -> str:
    saved = json.loads((RESULTS / SYMBOLIC).read_text())
    static = {r["model"]: r for r, _ in load_rows()}
    ran = saved["models"]
    same = [r for r in ran if r["status"] == static.get(r["model"], {}).get("status")]
    one_graph = [r for r in ran if isinstance(r.get("symbolic"), dict)
                 and r["symbolic"]["graphs_after"] == r["symbolic"]["graphs_before"]]
    state = "complete" if saved.get("complete") else "in progress"
    lines = [f"{len(ran)} of 114 models so far ({state}); {len(same)} with the static census's outcome; "
             f"{len(one_graph)} ran a second batch size on the same graph.", "",
             "| model | static | symbolic_batch | symbolic: why, or what it specialized |", "| --- | --- | --- | --- |"]
    for r in ran:
        s = static.get(r["model"], {"status": "-"})
        if r["status"] == s["status"]:
            continue
        note = why(r)
        if r["status"] == "specializes":
            note = "batch size a constant at " + ", ".join(r.get("specialized") or {}) + (
                f"; {note}" if note != "-" else "")
        lines.append(f"| {r['model']} | {s['status']} | {r['status']} | {note} |")
    if len(lines) == 4:
        lines.append("| (none) | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return cli(argv, __doc__.splitlines()[0], PAGE, START, END, table, f"bench/results/{SYMBOLIC}")


if __name__ == "__main__":
    sys.exit(main())
