"""A seconds-long smoke run of ``python -m simigrad_compile demo --quick``: three runs, table, JSON and plots."""

import json
import math

import pytest
import torch

from simigrad_compile.cli import main
from simigrad_compile.demo.data import stdlib_files
from simigrad_compile.demo.train import lr_factor

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


def test_quick_demo_runs_three_runs_and_writes_results(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:  # one thread: a tiny model's ops only wait on a busy machine's second core
        assert main(["demo", "--quick", "--no-progress", "--threads", "1", "--samples", "260", "--out",
                     str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "SimiGrad vs fixed B0" in out
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
