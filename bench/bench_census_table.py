"""The coverage census table of docs/census.md, generated from the census JSON in bench/results/.

The full census (``coverage-full-aot_eager-h1.json``) is the base; each re-run file (``coverage-rerun-main*.json``)
replaces the rows of the models it ran, and the table names the file each row comes from. Reads JSON only (no torch,
no model libraries).

    python bench/bench_census_table.py            # rewrite the table between the markers of docs/census.md
    python bench/bench_census_table.py --check    # exit 1 if the committed table differs from the JSON
    python bench/bench_census_table.py --print    # print the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs_table import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BASE = "coverage-full-aot_eager-h1.json"
RERUNS = ("coverage-rerun-main.json", "coverage-rerun-main-swin_v2_b.json", "coverage-rerun-main-vgg.json",
          "coverage-rerun-main-vgg11.json")
PAGE = REPO / "docs" / "census.md"
START, END = "<!-- census-table:start (bench/bench_census_table.py) -->", "<!-- census-table:end -->"
ORDER = ("split", "refused", "wrong", "noref", "error", "skipped")
MEANING = {"split": "fully split: statistics and gradient match the references",
           "refused": "refused by name: the step falls back to microsteps or ranks statistics",
           "wrong": "statistics differ from the reference", "noref": "no reference could be built",
           "error": "the model crashed the compile or the step", "skipped": "not run (memory cap, or does not build)"}


def load_rows() -> list[tuple[dict, str]]:
    """Every model once, in the base census's order: ``(record, source file)``, a re-run's record winning."""
    rows = {r["model"]: (r, BASE) for r in json.loads((RESULTS / BASE).read_text())["models"]}
    for name in RERUNS:
        for r in json.loads((RESULTS / name).read_text())["models"]:
            rows[r["model"]] = (r, name)
    return list(rows.values())


def why(record: dict) -> str:
    """What the census recorded against a model that is not fully split, in one cell."""
    if record["status"] == "split":
        return ""
    parts = [f"{reason} ({count} parameters)" for reason, count in record.get("reasons", {}).items()]
    parts += record.get("problems") or []
    for key in ("skip", "error"):
        if isinstance(record.get(key), str):
            parts.append(record[key].splitlines()[0][:160])
    return "; ".join(parts).replace("|", "/") or "-"


def table(rows: list[tuple[dict, str]]) -> str:
    counts = {s: sum(1 for r, _ in rows if r["status"] == s) for s in ORDER}
    counted = len(rows) - counts["skipped"]
    families = sorted({r["family"] for r, _ in rows})
    lines = [f"{counts['split']} of {counted} models that ran are fully split "
             f"({100 * counts['split'] / counted:.1f}%); {counts['skipped']} not run.", "",
             "| outcome | " + " | ".join(families) + " | all | meaning |",
             "| --- | " + " | ".join("---:" for _ in families) + " | ---: | --- |"]
    for s in ORDER:
        per = [sum(1 for r, _ in rows if r["status"] == s and r["family"] == f) for f in families]
        lines.append(f"| {s} | " + " | ".join(map(str, per)) + f" | {counts[s]} | {MEANING[s]} |")
    lines += ["", "| model | family | params | outcome | why | from |", "| --- | --- | ---: | --- | --- | --- |"]
    for r, source in rows:
        params = f"{r['params']:,}" if r.get("params") else "-"
        lines.append(f"| {r['model']} | {r['family']} | {params} | {r['status']} | {why(r)} | `{source}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return cli(argv, __doc__.splitlines()[0], PAGE, START, END, lambda: table(load_rows()), "bench/results/")


if __name__ == "__main__":
    sys.exit(main())
