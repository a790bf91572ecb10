"""``SimigradCallback`` on Lightning's FSDP2 strategy (``ModelParallelStrategy``, ``fully_shard`` in
``configure_model``), 2 and 3 CPU processes (gloo), launched by Lightning itself
(``simigrad_testkit.pl_fsdp_worker``): at a fixed batch the parameters equal plain Lightning FSDP2's at the same
global batches; at an adaptive batch every rank holds the same parameters and history, equal to one process's
plain fp64 loop; each step's statistics equal their fp64 reference from the two rank-halves' mean gradients, a
short batch inside a window included; a run resumed from Lightning's distributed checkpoint equals the
uninterrupted one. The refusals are checked without processes."""

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat  # noqa: E402
from simigrad_testkit.pl_fsdp_worker import SAMPLES, TAIL  # noqa: E402
from simigrad_testkit.sampler_windows import global_batches, without_loss  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(mode, world)``: each rank's saved result, one launch per (mode, world) for the whole module."""
    out, done = tmp_path_factory.mktemp("pl_fsdp"), {}

    def launch(mode: str, world: int) -> list:
        if (mode, world) not in done:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SIMIGRAD")}
            env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
            cmd = [sys.executable, "-m", "simigrad_testkit.pl_fsdp_worker", mode, str(out), str(world)]
            proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
            done[mode, world] = [torch.load(out / f"{mode}-{world}-rank{r}.pt", weights_only=False)
                                 for r in range(world)]
        return done[mode, world]

    launch.out = out
    return launch


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fixed_batch_equals_plain_lightning_fsdp(runs, world):
    """Batches of 4 per rank, the step fixed at world x 2 x 4: plain Lightning FSDP2 with batches of 8 per rank sees
    the same samples in each of its steps. FSDP2 sums the ranks in another order than the split (each half first),
    so the parameters agree to fp32 rounding."""
    plain, ours = runs("plain", world), runs("fixed", world)
    steps = 2 * SAMPLES["fixed"] // (8 * world)
    for rank in range(world):
        history = ours[rank]["history"]
        assert [(r["batch_size"], r["accumulation"], r["statistics"]) for r in history] == \
            [(8 * world, 2, "ranks")] * steps
        assert ours[rank]["global_step"] == plain[rank]["global_step"] == steps
        torch.testing.assert_close(ours[rank]["params"], plain[rank]["params"], rtol=1e-6, atol=1e-6)
        assert without_loss(history) == without_loss(ours[0]["history"])
    assert ours[0]["log_dir"] is not None and all(r["log_dir"] is None for r in ours[1:])
    (table,) = (runs.out / f"log-fixed-{world}").glob("**/*.csv")
    with open(table) as f:
        assert len(list(csv.DictReader(f))) == steps


def check_probe(result: dict, rank: int) -> None:
    """Each step's split statistics (read at its boundary, before the core scales the gradient) against
    ``g1 . g2``, ``|g1|^2``, ``|g2|^2`` of the halves' mean gradients in fp64 (``Probe``). FSDP's windows hold
    ``W / d`` with ``d`` the first micro-batch's 4 samples, so for ``n`` samples a rank the statistics are
    ``(n / 4)^2`` times the means'. The history's grad_norm is the norm of the whole mean gradient (not of a rank's
    shard), on every rank."""
    assert len(result["probe"]) == len(result["history"])
    for probe, record in zip(result["probe"], result["history"]):
        mode, *stats = probe["stats"]
        assert mode == "ranks"
        scale = (probe["samples"] / 4) ** 2
        for got, ref in zip(stats, probe["reference"]):
            assert abs(got / scale - ref) <= 1e-5 * abs(ref), (rank, record["step"], stats, probe["reference"])
        ref_norm = probe["grad_norm_reference"]
        assert abs(record["grad_norm"] - ref_norm) <= 1e-6 * ref_norm, (rank, record["step"])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_statistics_equal_the_fp64_reference(runs, world):
    for rank, result in enumerate(runs("fixed", world)):
        assert {p["samples"] for p in result["probe"]} == {8}
        check_probe(result, rank)


def one_process_reference(history, world: int, b0: int, samples: int = SAMPLES["adaptive"]):
    """The plain fp64 loop on one process over the same global batches (Lightning's shuffled DistributedSampler)."""
    torch.manual_seed(0)
    ref = Reference(Net(), "sgd", b0=b0, schedule=False)
    data = dataset(samples)
    x, y = data.tensors
    for r, index in global_batches(data, history, world=world):
        ref.step(x[index], y[index], skip=not r["stepped"])
    return flat(ref.model)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_adaptive_batch_agrees_on_every_rank(runs, world):
    """B0 world x 4, growing under target 0.9, two epochs: the same parameters and records, bit for bit, on every
    rank, equal to one process's plain fp64 loop over the same global batches; a window cut short by the epoch's
    end still reduce-scatters (its statistics are the ranks')."""
    ours = runs("adaptive", world)
    h0 = ours[0]["history"]
    for result in ours[1:]:
        assert without_loss(result["history"]) == without_loss(h0)
        assert torch.equal(result["params"], ours[0]["params"])
    assert {r["statistics"] for r in h0} == {"ranks"}
    assert len({r["batch_size"] for r in h0}) > 1
    assert sum(r["batch_size"] for r in h0) == 2 * SAMPLES["adaptive"]
    assert any(r["batch_size"] < r["target_batch_size"] for r in h0)
    torch.testing.assert_close(ours[0]["params"], one_process_reference(h0, world, b0=4 * world),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_short_batch_inside_a_window(runs, world):
    """The epoch's last batch (2 samples) is the second of its window: FSDP holds the first one's gradient in its
    own buffers, so the short batch is weighted by its own backward. The step's mean gradient equals the plain
    fp64 loop's over the same 6-samples-a-rank batch (with the LR scaled to it), and its statistics their fp64
    reference, on every rank."""
    ours = runs("tail", world)
    h0 = ours[0]["history"]
    per_epoch = (TAIL[world] // world + 7) // 8
    sizes = [8 * world] * (per_epoch - 1) + [6 * world]
    assert [(r["batch_size"], r["accumulation"]) for r in h0] == [(b, 2) for b in sizes * 2]
    for rank, result in enumerate(ours):
        assert without_loss(result["history"]) == without_loss(h0)
        assert torch.equal(result["params"], ours[0]["params"])
        check_probe(result, rank)
    torch.testing.assert_close(ours[0]["params"], one_process_reference(h0, world, 8 * world, TAIL[world]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_resume_from_lightning_distributed_checkpoint(runs, world):
    """The adaptive run stopped after its first epoch with ``ModelCheckpoint`` (ModelParallelStrategy's sharded
    save: a folder of one file per rank plus Lightning's metadata, which holds the callback's state), resumed by a
    fresh Trainer, module (other initial weights) and callback: the same parameters and records as the
    uninterrupted run, bit for bit."""
    whole, resumed = runs("adaptive", world), runs("resume", world)
    for rank in range(world):
        assert [r["step"] for r in resumed[rank]["history"]] == list(range(1, len(whole[rank]["history"]) + 1))
        assert without_loss(resumed[rank]["history"]) == without_loss(whole[rank]["history"])
        assert torch.equal(resumed[rank]["params"], whole[rank]["params"])
        assert resumed[rank]["global_step"] == whole[rank]["global_step"]


def test_tensor_parallelism_is_refused_by_name():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from simigrad_compile.integrations.lightning import _strategy_refusals

    strategy = ModelParallelStrategy()
    strategy._device_mesh = {"data_parallel": SimpleNamespace(size=lambda: 1),
                             "tensor_parallel": SimpleNamespace(size=lambda: 2)}
    (problem,) = _strategy_refusals(SimpleNamespace(strategy=strategy, world_size=2))
    assert "data-parallel size of 1 of 2 processes" in problem
    assert "ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)" in problem
    strategy._device_mesh["data_parallel"] = SimpleNamespace(size=lambda: 2)
    assert _strategy_refusals(SimpleNamespace(strategy=strategy, world_size=2)) == []


def test_a_module_without_fully_shard_is_refused_by_name():
    from simigrad_compile.integrations.lightning_fsdp import check_sharded

    with pytest.raises(NotImplementedError, match="found no fully_shard unit in Net: call .*configure_model"):
        check_sharded(Net())
