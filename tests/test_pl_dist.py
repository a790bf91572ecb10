"""``SimigradCallback`` on Lightning's ``strategy="ddp"`` (2 CPU processes, gloo), launched by Lightning itself
(``simigrad_testkit.pl_dist_worker``): at a fixed batch the parameters equal plain Lightning DDP's at the same
global batch; at an adaptive batch every rank holds the same parameters and history; rank 0 alone writes the log."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat  # noqa: E402
from simigrad_testkit.pl_dist_worker import SAMPLES  # noqa: E402
from simigrad_testkit.sampler_windows import global_batches, without_loss  # noqa: E402

HERE = Path(__file__).resolve().parent


def launch(out: Path, mode: str, strategy: str = "ddp") -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMIGRAD")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "simigrad_testkit.pl_dist_worker", mode, str(out), strategy]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return [torch.load(out / f"{mode}-{strategy}-rank{r}.pt") for r in (0, 1)]


def one_process_reference(history, b0: int):
    """The plain fp64 loop on one process over the same global batches: rank r's samples are those of the
    DistributedSampler Lightning puts in a training loader (shuffled, seed 0, ``set_epoch`` each epoch)."""
    torch.manual_seed(0)
    ref = Reference(Net(), "sgd", b0=b0, schedule=False)
    data = dataset(SAMPLES["adaptive"])
    x, y = data.tensors
    for r, index in global_batches(data, history):
        ref.step(x[index], y[index], skip=not r["stepped"])
    return flat(ref.model)


@pytest.mark.slow
def test_fixed_batch_equals_plain_lightning_ddp(tmp_path):
    """Batches of 4 per rank, the step fixed at 16 (2 ranks x 2 micro-batches): plain Lightning DDP with batches
    of 8 per rank sees the same samples in each of its steps."""
    plain = launch(tmp_path, "plain")
    ours = launch(tmp_path, "fixed")
    for rank in (0, 1):
        history = ours[rank]["history"]
        assert [(r["batch_size"], r["accumulation"], r["statistics"]) for r in history] == [(16, 2, "ranks")] * 8
        assert ours[rank]["global_step"] == plain[rank]["global_step"] == 8
        torch.testing.assert_close(ours[rank]["params"], plain[rank]["params"], rtol=1e-6, atol=1e-7)
    assert ours[0]["log_dir"] is not None and ours[1]["log_dir"] is None


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_adaptive_batch_agrees_on_every_rank(tmp_path, strategy):
    """B0 8 (2 ranks x 4), growing under target 0.9, two epochs: the same parameters and records, bit for bit, on
    both ranks, equal to one process's plain fp64 loop over the same global batches; one CSV, by rank 0."""
    ours = launch(tmp_path, "adaptive", strategy)
    h0, h1 = ours[0]["history"], ours[1]["history"]
    assert without_loss(h0) == without_loss(h1)
    assert torch.equal(ours[0]["params"], ours[1]["params"])
    assert {r["statistics"] for r in h0} == {"ranks"}
    assert len({r["batch_size"] for r in h0}) > 1
    assert sum(r["batch_size"] for r in h0) == 2 * SAMPLES["adaptive"]
    ends, position = [], 0
    for r in h0:
        position += r["batch_size"] // 2
        if position % (SAMPLES["adaptive"] // 2) == 0:
            ends.append(r)
    assert any(r["batch_size"] < r["target_batch_size"] for r in ends)   # a window cut short by the epoch's end
    torch.testing.assert_close(ours[0]["params"], one_process_reference(h0, b0=8), rtol=1e-5, atol=1e-5)
    (table,) = (tmp_path / f"log-adaptive-{strategy}").glob("**/*.csv")
    with open(table) as f:
        assert len(list(csv.DictReader(f))) == len(h0)
