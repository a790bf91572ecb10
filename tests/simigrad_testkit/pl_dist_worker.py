"""Lightning on 2 CPU processes (gloo), launched by Lightning itself: ``cd tests && python -m
simigrad_testkit.pl_dist_worker MODE OUT [STRATEGY]``.

MODE: ``plain`` (no callback, the loader's batch 8 per rank), ``fixed`` (``SimigradCallback`` on batches of 4 per
rank, the step's batch fixed at 16 = 2 ranks x 2 micro-batches x 4), ``adaptive`` (batches of 4, B0 8, growing; 72 samples).
STRATEGY: ``ddp`` (default) or ``ddp_spawn``. Each rank saves ``OUT/MODE-STRATEGY-rank{r}.pt``: its parameters
(fp64, flat), the core's history, the core's log_dir.
"""

import os
import sys

import lightning.pytorch as pl
import torch

from simigrad_compile.integrations.lightning import SimigradCallback
from simigrad_testkit.launch import exit_worker
from simigrad_testkit.lightning_module import PlainModule
from simigrad_testkit.loop_reference import Net, dataset, flat

SAMPLES = {"plain": 64, "fixed": 64, "adaptive": 72}
"""Samples per mode: 64 = 8 steps of 16 for the fixed comparison; 72 = 9 batches of 4 per rank, so that windows
end early with the epoch."""


class Save(pl.Callback):
    """Writes this rank's result at the end of the fit (inside the spawned process under ddp_spawn too)."""

    def __init__(self, path: str, simigrad=None):
        self.path, self.simigrad = path, simigrad

    def on_fit_end(self, trainer, pl_module):
        run = self.simigrad.run if self.simigrad is not None else None
        torch.save({"params": flat(pl_module.net), "history": list(run.history) if run else None,
                    "log_dir": run.config.log_dir if run else None, "world": trainer.world_size,
                    "global_step": trainer.global_step},
                   self.path.format(rank=trainer.global_rank))


def main(mode: str, out: str, strategy: str = "ddp") -> None:
    torch.manual_seed(0)
    net = Net()
    options = {
        "fixed": dict(batch_size=16, min_batch_size=16, max_batch_size=16, log_dir=os.path.join(out, f"log-{mode}")),
        "adaptive": dict(batch_size=8, min_batch_size=8, max_batch_size=48, target_similarity=0.9,
                         log_dir=os.path.join(out, f"log-{mode}-{strategy}")),
    }.get(mode)
    callback = SimigradCallback(**options) if options is not None else None
    save = Save(os.path.join(out, f"{mode}-{strategy}-rank{{rank}}.pt"), callback)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[c for c in (callback, save) if c is not None])
    loader = torch.utils.data.DataLoader(dataset(SAMPLES[mode]), batch_size=8 if mode == "plain" else 4)
    trainer.fit(PlainModule(net), loader)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_worker()
