"""The Lightning door (``SimigradCallback``) with the real ``lightning`` Trainer on a tiny LightningModule: every
update equals a hand-written fp64 plain loop over the same samples with the mean gradient (clipped, LR-scaled,
scheduled, or skipped as a whole)."""

import copy
import math

import pytest
import torch


pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat, loss_of, make_optimizer  # noqa: E402
from simigrad_testkit.lightning_module import PlainModule  # noqa: E402
from simigrad_compile.integrations.lightning import SimigradCallback  # noqa: E402

B0 = 8
OPTIONS = dict(group_mode="microsteps", batch_size=B0, min_batch_size=4, max_batch_size=24, target_similarity=0.3)


class Module(PlainModule):
    def configure_optimizers(self):
        opt = make_optimizer(self.parameters(), "sgd")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Collect(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name = "collect"
    version = 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))


def fit(net, data, callback, epochs=1, **trainer_args):
    logger = Collect()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback],
                         **trainer_args)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer.fit(Module(net), loader)
    return trainer, logger


def test_callback_steps_equal_a_plain_fp64_loop():
    """38 samples in batches of 4 (the last of 2), one NaN sample (index 13), clipping at 0.5, a per-step LR
    schedule, two epochs: the window holding the NaN is skipped whole (in each epoch), each epoch's last window
    ends early."""
    data = dataset(38)
    data.tensors[0][13, 0] = float("nan")
    torch.manual_seed(0)
    net = Net()
    ref = Reference(net, "sgd", b0=B0)
    callback = SimigradCallback(**{**OPTIONS, "target_similarity": 0.9})   # grows: the windows change size
    trainer, logger = fit(net, data, callback, epochs=2, gradient_clip_val=0.5)
    history = callback.run.history
    assert sum(r["batch_size"] for r in history) == 2 * 38
    assert len({r["accumulation"] for r in history}) > 1
    skipped = [r for r in history if not r["stepped"]]
    assert len(skipped) == 2 and {r["skipped"] for r in skipped} == {"non-finite-loss"}      # once per epoch
    assert any(r["grad_norm"] > 0.5 for r in history if r["stepped"])
    x, y = data.tensors
    position = 0
    for r in history:
        a, b = position % 38, position % 38 + r["batch_size"]
        position += r["batch_size"]
        if r["stepped"]:
            expected = loss_of(ref.model, x[a:b].double(), y[a:b].double()).item()
            assert r["loss"] == pytest.approx(expected, rel=1e-5)
            assert r["lr_scale"] == pytest.approx(math.sqrt(r["batch_size"] / B0))
        ref.step(x[a:b], y[a:b], skip=not r["stepped"], clip=(0.5, 2.0))
    torch.testing.assert_close(flat(net), flat(ref.model), rtol=1e-5, atol=1e-5)
    assert trainer.global_step == len(history)                       # Lightning counts optimizer steps
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == len(history) - 2   # skips held the schedule
    assert trainer.accumulate_grad_batches == 1
    logged = [row for row in logger.rows if "batch_size" in row]
    assert [row["batch_size"] for row in logged] == [r["batch_size"] for r in history]
    assert [row["lr_scale"] for row in logged] == pytest.approx([r["lr_scale"] for r in history])


def test_manual_accumulation_is_refused_by_name():
    torch.manual_seed(0)
    with pytest.raises(NotImplementedError, match="accumulate_grad_batches=2"):
        fit(Net(), dataset(8), SimigradCallback(**OPTIONS), accumulate_grad_batches=2)


def test_accumulation_one_reads_the_backend_statistics_and_checkpoints_resume(tmp_path):
    """A module compiled with ``backend="simigrad"`` (the passes without Inductor's code generation) and B0 = the
    loader's batch: each step is one micro-batch with the ``batch`` statistics of the compiled backward, whose
    cosine is that of the two half-batch gradients (fp64 reference). The checkpoint Lightning writes at the
    epoch's end holds the core's state, and a resumed fit continues its steps."""
    data = dataset(24)
    torch.manual_seed(0)
    net = Net()
    x, y = data.tensors
    start = copy.deepcopy(net).double()
    halves = []
    for sl in (slice(0, 4), slice(4, 8)):
        start.zero_grad()
        loss_of(start, x[sl].double(), y[sl].double()).backward()
        halves.append(torch.cat([p.grad.flatten() for p in start.parameters()]))
    expected = torch.nn.functional.cosine_similarity(*halves, dim=0).item()

    class Compiled(Module):
        def __init__(self, net):
            super().__init__(net)
            self.compiled = torch.compile(net, backend="simigrad", options={"compiler": "aot_eager"})

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.compiled(batch[0]), batch[1])

    options = dict(batch_size=8, min_batch_size=8, max_batch_size=8)
    callback = SimigradCallback(**options)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    module = Compiled(net)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    history = callback.run.history
    assert [(r["accumulation"], r["statistics"]) for r in history] == [(1, "batch")] * 3
    assert history[0]["cosine"] == pytest.approx(expected, abs=1e-5)

    (checkpoint,) = tmp_path.glob("**/*.ckpt")
    resumed = SimigradCallback(**options)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[resumed])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=checkpoint)
    assert [r["step"] for r in resumed.run.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.run.history[:3] == history


def test_multi_process_strategies_other_than_ddp_are_refused_by_name():
    """DDPStrategy (ddp, ddp_spawn) runs on many processes (tests/test_pl_dist.py); FSDP is refused by name."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from simigrad_compile.integrations.lightning import _strategy_refusals

    (problem,) = _strategy_refusals(SimpleNamespace(strategy=FSDPStrategy(), world_size=2))
    assert "FSDPStrategy on 2 processes" in problem and "strategy='ddp'" in problem
    assert _strategy_refusals(SimpleNamespace(strategy=DDPStrategy(), world_size=2)) == []
