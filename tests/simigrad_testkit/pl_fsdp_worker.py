"""Lightning's FSDP2 strategy on N CPU processes (gloo), launched by Lightning itself: ``cd tests && python -m
simigrad_testkit.pl_fsdp_worker MODE OUT WORLD``.

The LightningModule shards its net in ``configure_model`` (``fully_shard`` on each Linear and on the net, over the
data-parallel mesh of ``ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)``).
MODE: ``plain`` (no callback, the loader's batch 8 per rank), ``fixed`` (``SimigradCallback`` on batches of 4 per
rank, the step fixed at WORLD x 2 micro-batches x 4), ``tail`` (as ``fixed``, with a short last batch inside the
epoch's last window, :data:`TAIL`), ``adaptive`` (batches of 4, B0 WORLD x 4, growing), ``resume``
(``adaptive`` stopped after one epoch with a checkpoint, resumed by a fresh Trainer: :func:`resume`).
Each rank saves ``OUT/MODE-WORLD-rank{r}.pt``: its parameters (gathered, fp64, flat), the core's history and
log_dir, and in ``fixed`` and ``tail`` mode each step's statistics next to their fp64 reference (:class:`Probe`).
"""

import copy
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

import simigrad_compile
from simigrad_compile.integrations.lightning import SimigradCallback
from simigrad_testkit.launch import exit_worker
from simigrad_testkit.lightning_module import PlainModule
from simigrad_testkit.loop_reference import Net, dataset, loss_of

SAMPLES = {"plain": 96, "fixed": 96, "adaptive": 72}
"""96 = whole steps of 8 per rank at 2 and 3 processes; 72 = 9 (2 processes) or 6 (3) batches of 4 per rank, so
that windows end early with the epoch."""
TAIL = {2: 76, 3: 90}
"""``tail`` mode: 38 or 30 samples per rank, batches of 4 then a short one of 2, the second of its window."""


class ShardedModule(PlainModule):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for m in (self.net.fc1, self.net.fc2, self.net):
            fully_shard(m, mesh=mesh)


def full_flat(net: torch.nn.Module) -> torch.Tensor:
    """Every parameter gathered from its shards (a collective: every rank calls it), fp64, flat."""
    return torch.cat([p.full_tensor().detach().double().flatten() for p in net.parameters()])


class Probe(pl.Callback):
    """Placed before ``SimigradCallback``: at each step's boundary, reads the split statistics (without a reset,
    the core reads them next) and computes their fp64 reference: each rank's mean gradient over the step's
    samples on an unsharded fp64 copy of the net (the step's parameters, gathered), all-gathered; ``g1``, ``g2``
    the means of ranks ``[0, N//2)`` and ``[N//2, N)``; and the norm of the mean of all ranks' gradients."""

    def __init__(self, net: torch.nn.Module):
        self.reference = copy.deepcopy(net).double()
        self.batches, self.results = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stats = simigrad_compile.gradient_stats(pl_module)
        with torch.no_grad():
            for ref, p in zip(self.reference.parameters(), pl_module.net.parameters()):
                ref.copy_(p.full_tensor())
        x = torch.cat([b[0] for b in self.batches]).double()
        y = torch.cat([b[1] for b in self.batches]).double()
        self.batches = []
        self.reference.zero_grad()
        loss_of(self.reference, x, y).backward()
        local = torch.cat([p.grad.flatten() for p in self.reference.parameters()])
        world = dist.get_world_size()
        every = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(every, local)
        g1, g2 = sum(every[: world // 2]) / (world // 2), sum(every[world // 2:]) / (world - world // 2)
        mean = sum(every) / world
        self.results.append({"stats": (stats.mode, stats.dot, stats.sq_norm_1, stats.sq_norm_2),
                             "reference": (float(g1 @ g2), float(g1 @ g1), float(g2 @ g2)),
                             "grad_norm_reference": float(mean.norm()), "samples": len(x)})


class Save(pl.Callback):
    """Writes this rank's result at the end of the fit."""

    def __init__(self, path: str, simigrad=None, probe=None):
        self.path, self.simigrad, self.probe = path, simigrad, probe

    def on_fit_end(self, trainer, pl_module):
        run = self.simigrad.run if self.simigrad is not None else None
        torch.save({"params": full_flat(pl_module.net), "history": list(run.history) if run else None,
                    "log_dir": run.config.log_dir if run else None, "world": trainer.world_size,
                    "global_step": trainer.global_step, "probe": self.probe.results if self.probe else None},
                   self.path.format(rank=trainer.global_rank))


def trainer_for(world: int, callbacks, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=world,
                      strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
                      logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                      **kwargs)


def resume(out: str, world: int) -> None:
    """``resume``: the adaptive run, stopped after its first epoch with a distributed checkpoint
    (``ModelCheckpoint``, Lightning's sharded save), then a fresh Trainer and callback resumed from it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    options = dict(batch_size=4 * world, min_batch_size=4 * world, max_batch_size=24 * world, target_similarity=0.9)
    loader = torch.utils.data.DataLoader(dataset(SAMPLES["adaptive"]), batch_size=4)
    torch.manual_seed(0)
    first = SimigradCallback(**options)
    saver = ModelCheckpoint(dirpath=os.path.join(out, f"ckpt-{world}"), filename="epoch1", save_last=False)
    trainer_for(world, [first, saver], max_epochs=1).fit(ShardedModule(Net()), loader)
    torch.manual_seed(1)  # other initial weights: the checkpoint must bring the saved ones
    second = SimigradCallback(**options)
    save = Save(os.path.join(out, f"resume-{world}-rank{{rank}}.pt"), second)
    trainer_for(world, [second, save], enable_checkpointing=False).fit(
        ShardedModule(Net()), loader, ckpt_path=os.path.join(out, f"ckpt-{world}", "epoch1.ckpt"))


def main(mode: str, out: str, world: str) -> None:
    world = int(world)
    if mode == "resume":
        return resume(out, world)
    torch.manual_seed(0)
    net = Net()
    options = {
        "fixed": dict(batch_size=8 * world, min_batch_size=8 * world, max_batch_size=8 * world,
                      log_dir=os.path.join(out, f"log-{mode}-{world}")),
        "tail": dict(batch_size=8 * world, min_batch_size=8 * world, max_batch_size=8 * world),
        "adaptive": dict(batch_size=4 * world, min_batch_size=4 * world, max_batch_size=24 * world,
                         target_similarity=0.9, log_dir=os.path.join(out, f"log-{mode}-{world}")),
    }.get(mode)
    callback = SimigradCallback(**options) if options is not None else None
    probe = Probe(net) if mode in ("fixed", "tail") else None
    save = Save(os.path.join(out, f"{mode}-{world}-rank{{rank}}.pt"), callback, probe)
    trainer = trainer_for(world, [c for c in (probe, callback, save) if c is not None], enable_checkpointing=False)
    samples = TAIL[world] if mode == "tail" else SAMPLES[mode]
    loader = torch.utils.data.DataLoader(dataset(samples), batch_size=8 if mode == "plain" else 4)
    trainer.fit(ShardedModule(net), loader)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_worker()
