"""The tiny LightningModule the Lightning tests fit: the step's loss is :func:`loop_reference.loss_of`."""

import lightning.pytorch as pl

from simigrad_testkit.loop_reference import loss_of, make_optimizer


class PlainModule(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, *batch)

    def configure_optimizers(self):
        return make_optimizer(self.parameters())
