"""``AdaptiveBatching``: the hand-written loop's door over the step core.

It is :class:`~simigrad_compile.runtime.core.StepCore` with ``run.optimizer`` (an optimizer wrapper that drives
the core's protocol), ``run.dataloader()`` (micro-batches of the current rung) and the compile settings.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

import torch

from .. import compat
from ..config import SimigradConfig, from_mapping
from ..stats.compiled_once import check_compiled_once
from ..stats.gradient_stats import gradient_stats
from .compile_cache import EnvCompileCache
from .core import StepCore
from .data import AdaptiveLoader
from .optim import AdaptiveOptimizer
from .window import optimizer_params

log = logging.getLogger("simigrad_compile")
EXTRA_RECOMPILES = 8


def _world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class AdaptiveBatching(StepCore):
    """Adaptive batching for a hand-written loop: ``run.optimizer``, ``run.dataloader()``, compile settings.

    Compilation. Rungs compile lazily, on their first micro-batch; :meth:`warm_up` compiles every reachable rung
    up front.
    Dynamo keeps one graph per rung only if it may hold that many: while the run is open, the runtime raises
    ``torch._dynamo.config.recompile_limit`` to ``len(rungs) + 8`` if it is lower (logged), and :meth:`close`
    (or leaving ``with run:``) puts the old value back. With ``SIMIGRAD_COMPILE_CACHE=path`` the run loads the
    compiled graphs from ``path`` when it is created and (rank 0) saves them there after :meth:`warm_up` and at
    :meth:`close` (:mod:`~simigrad_compile.runtime.compile_cache`).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 config: Optional[SimigradConfig] = None, scaler=None, **options: Any):
        config = from_mapping(options, base=config)
        if isinstance(model, torch.nn.Module):
            check_compiled_once(model)
        world_size, rank = _world()
        super().__init__(model, optimizer, config, world_size=world_size, rank=rank, scaler=scaler)
        self.optimizer = AdaptiveOptimizer(optimizer, self)
        self._dynamo_saved = self._raise_recompile_limit()
        self.compile_cache = EnvCompileCache(rank)
        self._ddp = self._install_ranks_reduction()
        self._bucket_views = bool(getattr(self._ddp, "gradient_as_bucket_view", False))
        log.info("simigrad: %r, initial plan %s (target %d)", self.ladder, self.plan, self.controller.batch_size)

    @property
    def params(self) -> List[torch.nn.Parameter]:
        """The parameters the optimizer steps that require a gradient (read live from its param_groups)."""
        return optimizer_params(self.inner)

    # --- compile settings -------------------------------------------------------------------------------------
    def _raise_recompile_limit(self) -> Optional[int]:
        cfg = compat.dynamo_config()
        need = len(self.ladder.rungs) + EXTRA_RECOMPILES
        if cfg.recompile_limit >= need:
            return None
        old = cfg.recompile_limit
        cfg.recompile_limit = need
        log.info("simigrad: torch._dynamo.config.recompile_limit %d -> %d for %d rungs (restored by run.close())",
                 old, need, len(self.ladder.rungs))
        return old

    def _install_ranks_reduction(self):
        """Under data parallelism (group mode ``auto``/``ranks``) the statistics come from the split-group DDP
        reduction; returns the DDP module, whose gradient sync the loader turns off inside a window."""
        if self.world_size < 2 or self.config.group_mode not in ("auto", "ranks"):
            return None
        from ..distributed import _find_ddp, enable_ddp

        try:
            ddp = _find_ddp(self.model)
        except TypeError:
            log.warning("simigrad: world size %d but the model is not DistributedDataParallel: no 'ranks' "
                        "statistics; each rank uses its own", self.world_size)
            return None
        enable_ddp(ddp)
        return ddp

    def _sync_gradients(self, sync: bool) -> None:
        """Called by the loader before each micro-batch: DDP reduces (and the statistics are taken) only at the
        window's last micro-step, as under ``no_sync``."""
        self._sync = sync
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = sync

    def close(self) -> None:
        self.compile_cache.save("close")
        if self._dynamo_saved is not None:
            compat.dynamo_config().recompile_limit = self._dynamo_saved
            self._dynamo_saved = None
        if self.amp is not None:
            self.amp.close()
        self._history.close()

    def __enter__(self) -> "AdaptiveBatching":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dataloader(self, dataset, **kwargs) -> AdaptiveLoader:
        """Micro-batches of the current rung; ``DataLoader`` keyword arguments plus ``seed``/``device``."""
        return AdaptiveLoader(self, dataset, **kwargs)

    def plot(self, path: str) -> None:
        """Similarity (with the target line), batch size, LR multiplier and loss against samples (one PNG)."""
        self._history.plot(path, self.config.target_similarity)

    def warm_up(self, fn, dataset, collate_fn=None) -> None:
        """Compile every rung a plan can reach now (``Ladder.reachable_rungs``): ``fn(batch)`` runs forward +
        backward on a micro-batch of each (the first samples of ``dataset``). Gradients, statistics and the
        module's buffers are restored afterwards; the other rungs compile on first use, if ever."""
        loader = AdaptiveLoader(self, dataset, collate_fn=collate_fn)
        buffers = {k: v.clone() for k, v in self.model.state_dict().items()}
        rungs = self.ladder.reachable_rungs()
        if rungs != self.ladder.rungs:
            log.info("simigrad: warm-up compiles the rungs %s that plans within [min_batch_size, max_batch_size] "
                     "reach; %s compile on first use, if ever", rungs,
                     tuple(m for m in self.ladder.rungs if m not in rungs))
        for m in rungs:
            if m > len(dataset):
                log.warning("simigrad: warm-up skips rung %d: the dataset has %d samples", m, len(dataset))
                continue
            fn(loader._finish(loader.collate_fn([dataset[i] for i in range(m)])))
        self.model.load_state_dict(buffers)
        for p in self.params:
            p.grad = None
        gradient_stats(self.model, reset=True)
        self.compile_cache.save("warm-up")

    # --- the window protocol (loader and optimizer) -----------------------------------------------------------
    def _window_sizes(self, remaining: int, drop_last: bool) -> tuple:
        """The next step's micro-batch sizes with ``remaining`` samples (per rank) left in the epoch: the plan's,
        or at the tail the plan's micro-batches that cover ``remaining`` (``Ladder.tail``; the loader completes
        them from the next epoch); ``()`` when ``drop_last`` drops the tail."""
        m, k = self.plan.micro_batch_size, self.plan.accumulation
        if remaining >= m * k:
            return (m,) * k
        return () if drop_last else (m,) * self.ladder.tail(remaining, m)


__all__ = ["AdaptiveBatching"]
