"""The Lightning door (``SimigradCallback``) with the real ``lightning`` Trainer on a tiny LightningModule: every
update equals a hand-written fp64 plain loop over the same samples with the mean gradient (clipped, LR-scaled,
scheduled, or skipped as a whole)."""

import copy
import math

import pytest
import torch

from third_party import hide_broken_torchvision

hide_broken_torchvision()
pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402

from loop_reference import Net, Reference, dataset, flat, loss_of, make_optimizer  # noqa: E402
from simigrad_compile.integrations.lightning import SimigradCallback  # noqa: E402

B0 = 8
OPTIONS = dict(group_mode="microsteps", batch_size=B0, min_batch_size=4, max_batch_size=24, target_similarity=0.3)


class Module(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, *batch)

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
    schedule, two epochs: the window holding the NaN is skipped whole (in each epoch), each epoch's last window ends early."""
    data = dataset(38)
    data.tensors[0][13, 0] = float("nan")
    torch.manual_seed(0)
    net = Net()
    ref = Reference(net, "sgd", b0=B0)
    callback = SimigradCallback(**OPTIONS)
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
