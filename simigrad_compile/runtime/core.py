"""``AdaptiveBatching``: controller + ladder + loader + optimizer wrapper + history + state_dict.

Per optimizer step (one accumulation window), at the boundary:

1. Statistics. On one process with accumulation >= 2 the ``microsteps`` split wins: the backend's
   batch-mode sinks are read with ``reset=True`` and ignored for that step. Otherwise (accumulation 1, or
   ``world > 1``) the statistics are ``gradient_stats(model, reset=True)`` (modes ``batch`` / ``ranks``). When a
   one-process model records none (not compiled with the backend, or ``group_mode="microsteps"``), the ladder
   switches to at least two micro-steps, with a warning.
2. Gradients become the mean over the window's samples (:mod:`simigrad_compile.runtime.window`).
3. The wrapped optimizer steps with LR x ``lr_scale``; ``lr_scale`` follows the *realised* batch.
4. One history record; the controller updates the target; the ladder plans the next step.

Compilation. Rungs compile lazily, on their first micro-batch (``warmup="lazy"``); :meth:`warm_up` compiles
every rung up front. Dynamo keeps one graph per rung only if it may hold that many: while the run is open, the
runtime raises ``torch._dynamo.config.recompile_limit`` to ``len(rungs) + 8`` if it is lower (logged), and
:meth:`close` (or leaving ``with run:``) puts the old value back.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch

from ..config import SimigradConfig, from_mapping
from .controller import BatchSizeController
from .data import AdaptiveLoader
from .history import History
from .ladder import Ladder, Plan
from ..stats.gradient_stats import SplitStats, gradient_stats
from ..stats.microsteps import MicrostepStats
from .window import Window
from .optim import AdaptiveOptimizer

log = logging.getLogger("simigrad_compile")
EXTRA_RECOMPILES = 8


def _world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class AdaptiveBatching:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 config: Optional[SimigradConfig] = None, **options: Any):
        self.config = from_mapping(options, base=config)
        if self.config.batch_size is None:
            raise ValueError("AdaptiveBatching needs batch_size= (the initial global batch size B0)")
        self.model = model
        self.world_size, self.rank = _world()
        self.controller = BatchSizeController(self.config, self.config.batch_size)
        one_process_microsteps = self.world_size == 1 and self.config.group_mode == "microsteps"
        self.ladder = Ladder(self.config, self.world_size, min_accumulation=2 if one_process_microsteps else 1)
        self.plan: Plan = self.ladder.plan(self.controller.batch_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.microsteps = MicrostepStats(self.params)
        self.optimizer = AdaptiveOptimizer(optimizer, self)
        self._history = History(self.config.log_dir)
        self.similarity = float("nan")
        self._window: Optional[Window] = None
        self._epoch = self._position = self._samples = self._steps = 0
        self._loss = None
        self._dynamo_saved = self._raise_recompile_limit()
        self._ddp = self._install_ranks_reduction()
        log.info("simigrad: %r, initial plan %s (target %d)", self.ladder, self.plan, self.controller.batch_size)

    # --- compile settings -------------------------------------------------------------------------------------
    def _raise_recompile_limit(self) -> Optional[int]:
        cfg = torch._dynamo.config
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
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = sync

    def close(self) -> None:
        if self._dynamo_saved is not None:
            torch._dynamo.config.recompile_limit = self._dynamo_saved
            self._dynamo_saved = None
        self._history.close()

    def __enter__(self) -> "AdaptiveBatching":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- public views -----------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """The global batch size of the next (or current) optimizer step."""
        return self._window.samples * self.world_size if self._window else self.plan.batch_size

    @property
    def history(self) -> list:
        """One dict per optimizer step (keys: :data:`simigrad_compile.runtime.history.KEYS`)."""
        return self._history.records

    @property
    def target_batch_size(self) -> int:
        return self.controller.batch_size

    @property
    def lr_scale(self) -> float:
        return self.controller.lr_scale(self.batch_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    def dataloader(self, dataset, **kwargs) -> AdaptiveLoader:
        """Micro-batches of the current rung; ``DataLoader`` keyword arguments plus ``seed``/``device``."""
        return AdaptiveLoader(self, dataset, **kwargs)

    def log_loss(self, loss) -> None:
        """Record this micro-step's (mean) loss; the step's record holds the sample-weighted mean."""
        w = self._window
        size = w.sizes[w.done] if w is not None and not w.complete else self.plan.micro_batch_size
        value = loss.detach().float() * size
        self._loss = value if self._loss is None else self._loss + value

    def plot(self, path: str) -> None:
        self._history.plot(path)

    def warm_up(self, fn, dataset, collate_fn=None) -> None:
        """Compile every rung now: ``fn(batch)`` runs forward + backward on a micro-batch of each rung (the first
        samples of ``dataset``). Gradients, statistics and the module's buffers are restored afterwards."""
        loader = AdaptiveLoader(self, dataset, collate_fn=collate_fn)
        buffers = {k: v.clone() for k, v in self.model.state_dict().items()}
        for m in self.ladder.rungs:
            if m > len(dataset):
                log.warning("simigrad: warm-up skips rung %d: the dataset has %d samples", m, len(dataset))
                continue
            fn(loader._finish(loader.collate_fn([dataset[i] for i in range(m)])))
        self.model.load_state_dict(buffers)
        for p in self.params:
            p.grad = None
        gradient_stats(self.model, reset=True)

    # --- the window protocol (loader and optimizer) -----------------------------------------------------------
    def _window_sizes(self, remaining: int, drop_last: bool) -> tuple:
        """The next step's micro-batch sizes with ``remaining`` samples (per rank) left in the epoch: the plan's,
        or at the tail the plan's micro-batches that cover ``remaining`` (``Ladder.tail``; the loader completes
        them from the next epoch); ``()`` when ``drop_last`` drops the tail."""
        m, k = self.plan.micro_batch_size, self.plan.accumulation
        if remaining >= m * k:
            return (m,) * k
        return () if drop_last else (m,) * self.ladder.tail(remaining, m)

    def _open_window(self, sizes: Sequence[int]) -> Window:
        if self._window is not None and not self._window.complete:
            raise RuntimeError("simigrad: a new step started before the last one's micro-steps were all stepped")
        stats = self.microsteps if self.world_size == 1 else None
        self._window = Window(sizes, self.params, stats)
        return self._window

    def _micro_step_done(self) -> bool:
        if self._window is None or self._window.complete:
            self._open_window((self.plan.micro_batch_size,) * self.plan.accumulation)
        self._window.micro_step_done()
        if not self._window.complete:
            return False
        self._boundary(self._window)
        return True

    def _read_stats(self, window: Window) -> SplitStats:
        if window.stats is not None:
            ignored = gradient_stats(self.model, reset=True)
            if ignored.mode != "none":
                log.debug("simigrad: accumulation %d: microsteps statistics replace the %s ones",
                          window.accumulation, ignored.mode)
            return window.split_stats()
        stats = gradient_stats(self.model, reset=True)
        if stats.mode == "none" and self.world_size == 1 and self.ladder.min_accumulation < 2:
            log.warning("simigrad: no split statistics were recorded for this model (compiled with "
                        "backend='simigrad'?); switching to group mode microsteps: accumulation >= 2 from now on")
            self.ladder.require_accumulation(2)
        return stats

    def _boundary(self, window: Window) -> None:
        stats = self._read_stats(window)
        window.finish()
        realised = window.samples * self.world_size
        lr_scale = self.controller.lr_scale(realised)
        self.optimizer.scaled_step(lr_scale)
        cosine = stats.cosine
        target = self.controller.batch_size
        if stats.mode == "none":
            skipped = "no-statistics"
        else:
            skipped = self.controller.update(cosine).skipped
        self._steps += 1
        self._samples += realised
        self._position += window.samples
        loss = None
        if self._loss is not None:
            loss = float(self._loss) / window.samples
            self._loss = None
        self.similarity = cosine
        self._history.append({
            "step": self._steps, "samples": self._samples, "target_batch_size": target, "batch_size": realised,
            "micro_batch_size": window.sizes[0], "accumulation": window.accumulation,
            "cosine": cosine if math.isfinite(cosine) else float("nan"), "lr_scale": lr_scale, "skipped": skipped,
            "loss": loss,
        })
        self.plan = self.ladder.plan(self.controller.batch_size)

    def _end_epoch(self) -> None:
        self._epoch += 1
        self._position = 0

    # --- checkpoint -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._window is not None and not self._window.complete:
            raise RuntimeError("simigrad: state_dict() inside an accumulation window; save after run.optimizer.step() "
                               "completes a step (run.optimizer.stepped)")
        return {
            "controller": self.controller.state_dict(),
            "ladder": self.ladder.state_dict(),
            "plan": [self.plan.micro_batch_size, self.plan.accumulation],
            "epoch": self._epoch, "position": self._position, "samples": self._samples, "steps": self._steps,
            "similarity": self.similarity,
            "history": self._history.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.ladder.load_state_dict(state["ladder"])
        self.plan = Plan(int(state["plan"][0]), int(state["plan"][1]), self.world_size)
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._samples, self._steps = int(state["samples"]), int(state["steps"])
        self.similarity = float(state["similarity"])
        self._history.load_state_dict(state["history"])
        self._window = None


__all__ = ["AdaptiveBatching"]
