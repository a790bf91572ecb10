"""A seconds-long smoke run of ``python -m simigrad_compile demo --quick``: three runs, table, JSON and plots."""

import json
import math

import pytest
import torch

from simigrad_compile.cli import main
from simigrad_compile.demo.data import stdlib_files
from simigrad_compile.demo.experiment import equal_average_batch
from simigrad_compile.demo.report import SMOKE_NOTE, table
from simigrad_compile.demo.train import RunResult, _eta, lr_factor

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_stdlib_split_holds_out_every_tenth_file():
    train, val = stdlib_files()
    assert val and not set(train) & set(val)
    assert sorted(train + val) == sorted(set(train + val))


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0.0, 0.05) < 0.1
    assert lr_factor(0.05, 0.05) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.05) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("average,samples,world", [(38.04, 36864, 1), (21.0, 36864, 1), (50.0, 1000, 1),
                                                   (38.0, 36864, 4), (7.0, 30, 3), (3.0, 2, 1)])
def test_run_three_batch_divides_the_budget_and_is_the_nearest_such(average, samples, world):
    """Run 3 must train on exactly the budget in steps of one micro-batch (the default budget, 36864, once ended
    in a step of 4 sequences that no micro-batch of 38 could take)."""
    unit = 2 if world == 1 else world
    b = equal_average_batch(average, samples, world)
    assert samples % b == 0 and b % unit == 0
    others = [c for c in range(unit, samples + 1, unit) if samples % c == 0]
    assert all(abs(b - average) <= abs(c - average) for c in others)


def _runs(smoke: bool) -> list:
    """One seed's three runs: SimiGrad 2.5x fewer steps than B0 at a 1% worse loss, 1% better than run 3."""
    def run(name, loss, steps):
        return RunResult(name=name, seed=0, batch_size="16", lr=1e-3, val_loss=loss, steps=steps, samples=1000,
                         smoke=smoke)
    return [[run("fixed B=16", 2.00, 100), run("SimiGrad B>=16", 2.02, 40), run("fixed B=24 (avg)", 2.04, 40)]]


def test_table_judges_a_measured_run_and_not_a_smoke_run():
    measured, smoke = table(_runs(smoke=False)), table(_runs(smoke=True))
    assert "(within 2%: yes)" in measured and "(>= 2x: yes)" in measured and "(no worse: yes)" in measured
    assert SMOKE_NOTE not in measured
    assert "yes)" not in smoke and "NO)" not in smoke and smoke.count("not judged") == 3 and SMOKE_NOTE in smoke


def test_eta_extrapolates_the_rate_so_far():
    assert _eta(30.0, 1000, 4000) == "about 90 s left in this run"
    assert _eta(30.0, 4000, 4000) == "done" and _eta(0.0, 0, 4000) == "ETA unknown"


def test_run_three_batch_refuses_a_budget_of_odd_halves():
    with pytest.raises(ValueError, match="--samples 37 is not a multiple of 2"):
        equal_average_batch(20.0, 37)


def test_quick_demo_runs_three_runs_and_writes_results(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:  # one thread: a tiny model's ops only wait on a busy machine's second core
        assert main(["demo", "--quick", "--no-progress", "--threads", "1", "--samples", "260", "--out",
                     str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "SimiGrad vs fixed B0" in out
    # what it costs, first; then verdicts that a smoke run cannot show are not given
    assert out.startswith("simigrad demo: 1 seed(s) x 3 runs x 260 sequences; a smoke run"), out[:300]
    assert "(within 2%: not judged)" in out and "(>= 2x: not judged)" in out and ": NO)" not in out
    assert SMOKE_NOTE in out
    doc = json.loads((tmp_path / "results.json").read_text())
    (fixed, simigrad, average), = doc["seeds"]
    assert doc["settings"]["samples"] == 260
    for run in (fixed, simigrad, average):  # the last step is cut, never overshoots: every run sees the same samples
        assert run["samples"] == 260, run["name"]
        assert math.isfinite(run["val_loss"]) and run["steps"] > 0
    assert fixed["average_batch"] == doc["settings"]["batch_size"]
    assert len(simigrad["history"]) == simigrad["steps"]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "simigrad.png").stat().st_size > 0


def test_quick_demo_under_torchrun_two_ranks(tmp_path):
    """``torchrun --nproc_per_node=2 -m simigrad_compile demo``: DDP with the split-group reduction."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMIGRAD")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "simigrad_compile", "demo", "--quick", "--no-progress", "-v", "--out", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "SimiGrad vs fixed B0" in out.stdout and "simigrad ddp: world 2" in out.stderr
    (fixed, simigrad, _), = json.loads((tmp_path / "results.json").read_text())["seeds"]
    cosines = [r["cosine"] for r in simigrad["history"]]
    assert all(math.isfinite(c) for c in cosines) and simigrad["samples"] >= fixed["samples"]
