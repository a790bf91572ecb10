"""docs/outcome.md's table is what bench/bench_outcome_table.py renders from the committed
bench/results/outcome_runs.json, so that the docs cannot drift from the measurement; and the renderer's figures
(reach, the loses-on column, the 2%/2x bar) come from the rows, checked on hand-made rows."""

import copy
import json
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.append(BENCH)  # bench/ names all start with bench_: none shadows a package

import bench_outcome  # noqa: E402
import bench_outcome_table as table  # noqa: E402


def committed():
    return json.loads(table.JSON.read_text())


def test_docs_table_is_the_rendered_json():
    assert table.documented(table.DOC.read_text()) == table.render(committed())


def test_a_changed_row_changes_the_table():
    data = committed()
    changed = copy.deepcopy(data)
    row = next(r for r in changed["rows"] if r["run"] == "simigrad")
    row["val_loss"] *= 1.5
    assert table.render(changed) != table.render(data)


def test_committed_json_covers_the_protocol():
    """Both budgets of the three workloads, six runs each, three or more seeds, every run on exactly its budget."""
    data = committed()
    seeds = data["meta"]["seeds"]
    assert len(seeds) >= 3
    keys = {(r["workload"], r["budget_name"], r["seed"], r["run"]) for r in data["rows"]}
    want = {(w, b, s, run) for w in ("gpt", "cnn_bn", "cnn") for b in ("short", "long") for s in seeds
            for run in bench_outcome.RUNS}
    assert keys == want
    for r in data["rows"]:
        assert r["samples"] == r["budget"] == sum(r["batch"]) and r["curve"][-1][0] == r["budget"]
        assert len(r["batch"]) == r["steps"]


def _row(run, seed, loss, acc, steps, wall, curve, bounds=(16, 1024)):
    return {"workload": "cnn", "budget_name": "short", "budget": 64, "seed": seed, "run": run, "val_loss": loss,
            "val_acc": acc, "steps": steps, "wall_s": wall, "average_batch": 64 / steps,
            "batch_bounds": list(bounds), "curve": curve}


def test_reach_and_verdicts_on_hand_made_rows():
    fixed = [_row("fixed", s, 1.0, 0.9, 4, 10.0, [[32, 2, 5.0, 1.5, 0.8], [64, 4, 10.0, 1.0, 0.9]], (16, 16))
             for s in (0, 1)]
    # seed 0 reaches 1.0 at its first evaluation; seed 1 never does (1.03 > 1.0)
    sg = [_row("simigrad", 0, 0.99, 0.9, 1, 4.0, [[32, 1, 2.0, 0.99, 0.9], [64, 1, 4.0, 0.99, 0.9]]),
          _row("simigrad", 1, 1.03, 0.88, 2, 12.0, [[32, 1, 6.0, 1.2, 0.8], [64, 2, 12.0, 1.03, 0.88]])]
    s = table.summarize(fixed + sg)[("cnn", "short", "simigrad")]
    assert (s["reached"], s["reach_samples"], s["reach_steps"], s["reach_wall"]) == (1, 32, 1, 2.0)
    f = table.summarize(fixed)[("cnn", "short", "fixed")]
    # mean loss 1.01 (+1%: within 2%), acc -1 pt, 2.7x fewer steps, wall 8.0 < 10.0
    assert table.losses(s, f) == "acc -1.0 pt"
    sg[1]["val_loss"] = 1.07  # mean +3%
    s = table.summarize(fixed + sg)[("cnn", "short", "simigrad")]
    assert table.losses(s, f) == "loss +3%, acc -1.0 pt"


def test_ladder_round():
    assert [bench_outcome.ladder_round(a, 16, 1024) for a in (10, 16, 22, 23, 45, 46, 700, 5000)] == \
        [16, 16, 16, 32, 32, 64, 512, 1024]
