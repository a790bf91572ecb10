"""The Lightning door on FSDP2: ``strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``.

Lightning's FSDP2 strategy leaves the sharding to the user (``fully_shard`` in ``LightningModule.configure_model``)
and wraps nothing: ``trainer.strategy.model`` is the LightningModule, whose ``fully_shard`` units the core finds
and whose reduce-scatters it replaces with the split one
(:func:`~simigrad_compile.distributed.enable_fsdp`: ``ranks`` statistics, any world size >= 2).

Accumulation. Lightning's ``block_backward_sync`` does nothing under this strategy (it knows only DDP's
``no_sync``), so the callback sets FSDP's gradient sync itself before each micro-batch (:func:`sync_window`):
off inside a window, on for the batch Lightning steps on, and FSDP reduce-scatters once per step. Between, FSDP
keeps the micro-batches' sum in its own unsharded buffers, where the core cannot rescale it (its windows are
``held``, :mod:`~simigrad_compile.runtime.window`): a micro-batch of another size inside a window (the epoch's
short last batch) is weighted by its own backward instead, through the loss hook's factor.

Refused: tensor parallelism (``tensor_parallel_size > 1``: the loader's sampler then shards over the data-parallel
ranks only, and the split needs FSDP over the whole world), and a module with no ``fully_shard`` unit.
"""

from __future__ import annotations

from typing import List

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from ..distributed import fsdp_units
from ..runtime.adaptive import AdaptiveBatching


def is_fsdp(trainer) -> bool:
    """True for Lightning's FSDP2 strategy on more than one process."""
    return trainer.world_size > 1 and isinstance(trainer.strategy, ModelParallelStrategy)


def strategy_refusals(trainer) -> List[str]:
    """What :func:`is_fsdp`'s strategy must not be set to (checked at ``setup``, once the device mesh exists)."""
    strategy, world = trainer.strategy, trainer.world_size
    mesh = strategy.device_mesh
    data = mesh["data_parallel"].size()
    if data == world:
        return []
    return [f"ModelParallelStrategy with a data-parallel size of {data} of {world} processes (tensor "
            f"parallelism over {mesh['tensor_parallel'].size()}): the split reduction needs FSDP over every "
            f"process; use ModelParallelStrategy(data_parallel_size={world}, tensor_parallel_size=1)"]


def check_sharded(module: torch.nn.Module) -> None:
    """Raise unless ``configure_model`` put ``fully_shard`` units in ``module``."""
    if not fsdp_units(module):
        raise NotImplementedError(
            f"simigrad: SimigradCallback under ModelParallelStrategy found no fully_shard unit in "
            f"{type(module).__name__}: call torch.distributed.fsdp.fully_shard on its layers (and on the module) "
            "in LightningModule.configure_model, with mesh=self.device_mesh['data_parallel']")


def sync_window(run: AdaptiveBatching, trainer) -> None:
    """At a batch's start, after the callback set ``accumulate_grad_batches``: FSDP reduce-scatters (and the
    statistics are taken) on the batch Lightning steps on (the window's last, or the epoch's), not before. The
    epoch loop's own test decides, as it decides DDP's ``no_sync``."""
    run.set_sync_gradients(not trainer.fit_loop.epoch_loop._should_accumulate())


__all__ = ["check_sharded", "is_fsdp", "strategy_refusals", "sync_window"]
