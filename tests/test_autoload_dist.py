"""``SIMIGRAD=1 torchrun --nproc_per_node=2`` of an ordinary DDP loop (``simigrad_testkit.autoload_dist_worker``):
at a fixed batch its parameters equal the plain DDP loop's at the same global batch; at an adaptive batch every
rank holds the same parameters and history; DDP reduces once per step; rank 0 alone writes the log."""

import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simigrad_testkit.autoload_dist_worker import problem
from simigrad_testkit.sampler_windows import global_batches, without_loss

HERE = Path(__file__).resolve().parent


def launch(out: Path, tag: str, batch: int, epochs: int, compile: bool = False, **simigrad) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMIGRAD")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", **simigrad)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "simigrad_testkit.autoload_dist_worker", str(out), tag, str(batch), str(epochs), str(int(compile))]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return [torch.load(out / f"{tag}-rank{r}.pt") for r in (0, 1)], proc.stderr


def one_process_reference(history, b0: int, lr: float = 0.05):
    """The plain loop on one process, in fp64, over the same global batches: each step the mean loss over both
    ranks' samples of that step (in DistributedSampler's order, a window ending with the epoch), SGD with
    momentum at ``lr x sqrt(batch / b0)``."""
    data, net = problem()
    model = copy.deepcopy(net).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = (t.double() for t in data.tensors)
    for r, index in global_batches(data, history):
        assert r["lr_scale"] == pytest.approx(math.sqrt(r["batch_size"] / b0))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[index]), y[index]).backward()
        for group in opt.param_groups:
            group["lr"] = lr * r["lr_scale"]
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_fixed_batch_equals_the_plain_ddp_loop(tmp_path):
    """Batches of 8 per rank, the step fixed at 32 (2 ranks x 2 micro-batches): the plain DDP loop with batches
    of 16 per rank sees the same samples in each step (DistributedSampler's order)."""
    plain, _ = launch(tmp_path, "plain", 16, 2)
    ours, err = launch(tmp_path, "fixed", 8, 2, SIMIGRAD="1", SIMIGRAD_BATCH_SIZE="32", SIMIGRAD_MIN_BATCH_SIZE="32",
                       SIMIGRAD_MAX_BATCH_SIZE="32")
    assert err.count("simigrad: SIMIGRAD=1 adapts the batch") == 1        # rank 0 alone says it
    for rank in (0, 1):
        history = ours[rank]["history"]
        assert [(r["batch_size"], r["accumulation"], r["statistics"]) for r in history] == [(32, 2, "ranks")] * 8
        assert ours[rank]["reduced"] == len(history)                     # one reduction per step, not per batch
        torch.testing.assert_close(ours[rank]["params"], plain[rank]["params"], rtol=1e-6, atol=1e-7)
    assert torch.equal(ours[0]["params"], ours[1]["params"])


@pytest.mark.slow
def test_adaptive_batch_agrees_on_every_rank(tmp_path):
    """Growing from 16 (2 x 8) under target 0.9, compiled (aot_eager), three epochs: the same parameters and
    records, bit for bit, on both ranks, equal to one process's plain fp64 loop over the same global batches; one
    reduction per step; one CSV, by rank 0."""
    logs = tmp_path / "log"
    ours, err = launch(tmp_path, "adaptive", 8, 3, compile=True, SIMIGRAD="1", SIMIGRAD_TARGET_SIMILARITY="0.9",
                       SIMIGRAD_MIN_BATCH_SIZE="16", SIMIGRAD_MAX_BATCH_SIZE="96", SIMIGRAD_COMPILER="aot_eager",
                       SIMIGRAD_LOG_DIR=str(logs))
    h0, h1 = ours[0]["history"], ours[1]["history"]
    assert without_loss(h0) == without_loss(h1)
    assert torch.equal(ours[0]["params"], ours[1]["params"])
    assert {r["statistics"] for r in h0} == {"ranks"}
    assert len({r["batch_size"] for r in h0}) > 1
    assert sum(r["batch_size"] for r in h0) == 3 * 128                 # every sample once per epoch
    assert ours[0]["reduced"] == ours[1]["reduced"] == len(h0)
    torch.testing.assert_close(ours[0]["params"], one_process_reference(h0, b0=16), rtol=1e-5, atol=1e-5)
    (table,) = logs.glob("**/*.csv")
    with open(table) as f:
        assert len(list(csv.DictReader(f))) == len(h0)
    assert err.count("simigrad step 1:") <= 1                           # rank 0's step lines only
