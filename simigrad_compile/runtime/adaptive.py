"""``AdaptiveBatching``: the hand-written loop's door over the step core.

It is :class:`~simigrad_compile.runtime.core.StepCore` with ``run.optimizer`` (an optimizer wrapper that drives
the core's protocol), ``run.dataloader()`` (micro-batches of the current rung), the compile settings and, under
data parallelism, the split-group DDP reduction. The Hugging Face and Lightning doors build one too and drive
its protocol themselves (they never touch ``run.optimizer``, so the user's optimizer is theirs to step).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from .. import compat
from .. import envvars
from ..config import SimigradConfig, from_mapping, resolve_group_mode
from ..stats.compiled_once import check_compiled_once
from ..stats.gradient_stats import gradient_stats
from .compile_cache import EnvCompileCache
from .core import StepCore
from .data import AdaptiveLoader
from .optim import AdaptiveOptimizer, DirectStepError

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
        config = from_mapping(options, base=config if config is not None else envvars.config_from_env())
        if isinstance(model, torch.nn.Module):
            check_compiled_once(model)
        world_size, rank = _world()
        ddp, fsdp = _ranks_reduction(model, config, world_size)
        super().__init__(model, optimizer, config, world_size=world_size, rank=rank, scaler=scaler,
                         bucket_views=bool(getattr(ddp, "gradient_as_bucket_view", False)))
        self.optimizer = AdaptiveOptimizer(optimizer, self)
        """What the hand-written loop steps: ``run.optimizer.step()``, ``zero_grad()``, ``scaler.step(...)``."""
        self._guard = optimizer.register_step_pre_hook(self._refuse_direct_step)
        self._dynamo_saved = self._raise_recompile_limit()
        self._ddp = ddp
        self._fsdp = fsdp
        """The FSDP2 root whose reduce-scatter is the split (its units' gradient sync follows the window)."""
        self.grads_held = fsdp is not None  # FSDP holds a window's sum in its own buffers (window.py: held)
        self.compile_cache = EnvCompileCache(rank)
        log.info("simigrad: %r, initial plan %s (target %d)", self.ladder, self.plan, self.controller.batch_size)

    def _refuse_direct_step(self, optimizer, args, kwargs) -> None:
        """The user's optimizer steps only at a step's boundary (from ``run.optimizer.step()``, or from a door
        that drives the protocol and steps it between ``begin_step`` and ``end_step``)."""
        if not self.state.at_boundary:
            name = type(optimizer).__name__
            raise DirectStepError(
                f"simigrad: {name}.step() was called on the optimizer passed to AdaptiveBatching, inside a step "
                f"(micro-step {self.state.micro_step + 1} of {self.state.micro_steps}). Step the wrapper instead: "
                f"run.optimizer.step() and run.optimizer.zero_grad() (or scaler.step(run.optimizer)); it steps the "
                f"{name} once per optimizer step, at the last micro-batch, with the step's mean gradient and the "
                "scaled LR.")

    def allow_direct_steps(self) -> None:
        """Let the user's optimizer be stepped inside a step (a door whose loop steps it on every micro-batch
        while the gradients are held aside: ``SIMIGRAD=1``)."""
        if self._guard is not None:
            self._guard.remove()
            self._guard = None

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

    def set_sync_gradients(self, sync: bool) -> None:
        """Before each micro-batch (the loader): DDP reduces (and the statistics are taken) only at the window's
        last micro-step, as under ``no_sync``; FSDP2 reduce-scatters only then (``set_requires_gradient_sync``)."""
        super().set_sync_gradients(sync)
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = sync
        if self._fsdp is not None:
            from ..distributed import set_gradient_sync

            set_gradient_sync(self._fsdp, sync)

    def close(self) -> None:
        """End the run (:meth:`StepCore.close`), save the compile cache where ``SIMIGRAD_COMPILE_CACHE`` asks,
        put Dynamo's recompile limit back, and let the user's optimizer be stepped directly again."""
        super().close()
        self.compile_cache.save("close")
        if self._dynamo_saved is not None:
            compat.dynamo_config().recompile_limit = self._dynamo_saved
            self._dynamo_saved = None
        self.allow_direct_steps()

    def __enter__(self) -> "AdaptiveBatching":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dataloader(self, dataset, **kwargs) -> AdaptiveLoader:
        """Micro-batches of the current rung; ``DataLoader`` keyword arguments plus ``seed``/``device``."""
        return AdaptiveLoader(self, dataset, **kwargs)

    def warm_up(self, fn, dataset, collate_fn=None) -> None:
        """Compile every rung a plan can reach now (``Ladder.reachable_rungs``; with ``symbolic_batch`` the largest
        of them, and a rung of 1 where reachable): ``fn(batch)`` runs forward + backward on a micro-batch of each
        (the first samples of ``dataset``). Gradients, statistics and the module's buffers are restored
        afterwards; the other rungs compile on first use, if ever."""
        loader = AdaptiveLoader(self, dataset, collate_fn=collate_fn)
        buffers = {k: v.clone() for k, v in self.model.state_dict().items()}
        rungs = self.ladder.reachable_rungs()
        if self.config.symbolic_batch:  # one graph serves every rung of 2 or more; a rung of 1 has its own
            rungs = tuple(m for m in rungs if m == 1) + tuple(m for m in rungs[-1:] if m >= 2)
        elif rungs != self.ladder.rungs:
            log.info("simigrad: warm-up compiles the rungs %s that plans within [min_batch_size, max_batch_size] "
                     "reach; %s compile on first use, if ever", rungs,
                     tuple(m for m in self.ladder.rungs if m not in rungs))
        for m in rungs:
            if m > len(dataset):
                log.warning("simigrad: warm-up skips rung %d: the dataset has %d samples", m, len(dataset))
                continue
            fn(loader.prepare(loader.collate_fn([dataset[i] for i in range(m)])))
        self.model.load_state_dict(buffers)
        for p in self.params:
            p.grad = None
        gradient_stats(self.model, reset=True)
        self.compile_cache.save("warm-up")


def _ranks_reduction(model, config: SimigradConfig, world_size: int) -> tuple:
    """Under data parallelism (group mode ``auto``/``ranks``) the statistics come from the split-group reduction:
    installs it and returns ``(ddp, fsdp)``: the DDP module, or the FSDP2 root (a model with ``fully_shard``
    units, :func:`~simigrad_compile.distributed.enable_fsdp`), whose gradient sync a window turns off until its
    last micro-step; ``(None, None)`` otherwise."""
    if world_size < 2 or resolve_group_mode(config.group_mode, world_size) != "ranks":
        return None, None
    from ..distributed import enable_ddp, enable_fsdp, find_ddp, fsdp_units

    try:
        ddp = find_ddp(model)
    except TypeError:
        if isinstance(model, torch.nn.Module) and fsdp_units(model):
            enable_fsdp(model)
            return None, model
        log.warning("simigrad: world size %d but the model is neither DistributedDataParallel nor FSDP2 "
                    "(fully_shard): no 'ranks' statistics; each rank uses its own", world_size)
        return None, None
    enable_ddp(ddp)
    return ddp, None


__all__ = ["AdaptiveBatching"]
