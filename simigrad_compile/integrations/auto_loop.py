"""Adaptive batching of an unmodified training loop under ``SIMIGRAD=1``, through global optimizer hooks.

The loop stays as the user wrote it: ``zero_grad``, forward, ``backward``, ``step``, with its own DataLoader.
Its loader's batch becomes the micro-batch; the effective batch grows by gradient accumulation, with the LR
scaled. :func:`install` is called by :mod:`simigrad_compile.integrations.autoload` at ``import torch`` when ``SIMIGRAD=1``.

How it works
------------
* **Micro-batch size.** ``DataLoader`` iterators' ``__next__`` is wrapped to record each fetched batch's
  declared size (its batch sampler's ``batch_size``) and measured size (dim ``batch_dim``, default 0, of the
  first tensor in the batch). The declared size of the batch before the first ``step()`` is the micro-batch.
  A loop without a DataLoader must set ``SIMIGRAD_BATCH_SIZE`` to its batch; otherwise the first ``step()``
  raises.
* **Every ``optimizer.step()`` is a micro-step.** ``torch.optim.optimizer.register_optimizer_step_pre_hook``
  and ``..._post_hook`` act on every optimizer in the process.

  - Inside an accumulation window the pre-hook moves each parameter's ``.grad`` into a side buffer (weighted by
    its micro-batch's sample count) and sets ``.grad = None``. torch's optimizers skip a parameter whose grad is
    None without touching its state (checked on torch 2.13 for SGD, Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad,
    Adadelta, Adamax, ASGD, Rprop, Adafactor; for-loop, foreach and fused), so that step changes nothing, and
    whatever ``zero_grad`` form follows (``set_to_none`` or not, ``model.zero_grad()``) has nothing to lose.
  - At the window's last micro-step the pre-hook sets ``.grad`` to the sample-weighted mean gradient of the
    window, computes the statistics, feeds the controller, and multiplies each param group's ``lr`` by the LR
    multiplier of the realised batch. The optimizer takes one real step. The post-hook puts back the exact
    ``lr`` objects the user had.
  - With accumulation 1 nothing is buffered: the gradients and the step are bit-identical to the plain loop's
    (the LR multiplier is then exactly 1 when the batch is ``B0``).
* **Statistics.** With accumulation >= 2: ``microsteps``, the mean gradient of the first ``floor(k/2)``
  micro-steps against that of the rest (each half weighted by its own sample count). With accumulation 1: the
  ``batch`` statistics that the ``simigrad`` backend recorded in the compiled backward for the optimizer's
  parameters (``SIMIGRAD=1`` makes a plain ``torch.compile(model)`` use that backend). An eager model records
  none: its first step at accumulation 1 has a NaN cosine (the controller skips it), a warning is logged, and
  from then on that optimizer accumulates at least 2 micro-batches per step (realised batch >= 2 x micro,
  whatever the target) so that the ``microsteps`` signal exists.
* **Controller.** :class:`~simigrad_compile.runtime.controller.BatchSizeController` with ``B0 = SIMIGRAD_BATCH_SIZE``
  or else the micro-batch. The next window's accumulation is the controller's target divided by the
  micro-batch, rounded to the nearest integer (>= 1) and moved inside ``[min_batch_size, max_batch_size]``
  when a multiple of the micro-batch fits there.
* **Logging.** Each real step logs one INFO line on ``simigrad_compile`` and appends one record to
  :func:`history`.

Limits
------
* **LR schedulers** step once per user ``step()``, that is per micro-batch, so a schedule in steps is a
  schedule in micro-batches (samples), whatever the batch size. The multiplier applies on top of it.
* **Gradient clipping** before ``step()`` clips each micro-batch's gradient, not the window's mean.
* **AMP GradScaler**: ``scaler.step`` unscales before it calls ``optimizer.step``, so the buffers hold unscaled
  gradients. A micro-step with inf/NaN gradients never reaches the optimizer and is left out of the window,
  as plain GradScaler drops that step.
* **Weight decay and momentum** act once per real step: fewer, larger steps.
* **Extra memory** while a window is open: up to two gradient-sized buffers (the halves' sums) beside the live
  ``.grad``. None at accumulation 1.
* ``optimizer.step(closure)`` (LBFGS) raises: the closure recomputes gradients inside the step.
* **Data parallel** (``torch.distributed`` world size > 1) raises at the first step: ranks would have to agree
  on every decision, and DDP would all-reduce at every micro-step. Use ``AdaptiveBatching`` there.
* Every optimizer gets its own controller and windows; an optimizer that ``AdaptiveBatching`` drives is left
  alone through :func:`exclude`.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.utils._pytree import tree_leaves

from ..config import SimigradConfig
from ..runtime.controller import BatchSizeController
from ..kernels import pair_stats
from ..stats.gradient_stats import SplitStats, gradient_stats

log = logging.getLogger("simigrad_compile")

_config: Optional[SimigradConfig] = None
_handles: list = []
_windows: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _Window]" = weakref.WeakKeyDictionary()
_excluded: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_fetched: Dict[str, Optional[int]] = {"declared": None, "measured": None}
_original_next = None


@dataclass
class _Window:
    controller: BatchSizeController
    micro: int
    accumulation: int
    seen: int = 0
    weights: List[float] = field(default_factory=lambda: [0.0, 0.0])
    halves: List[Dict[torch.nn.Parameter, torch.Tensor]] = field(default_factory=lambda: [{}, {}])
    window_samples: int = 0
    samples: int = 0
    steps: int = 0
    saved_lrs: Optional[list] = None
    min_accumulation: int = 1
    history: List[dict] = field(default_factory=list)


def install(config: SimigradConfig) -> None:
    """Hook every optimizer's ``step`` and every DataLoader iterator (idempotent)."""
    global _config, _original_next
    _config = config
    if _handles:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    _handles.append(register_optimizer_step_pre_hook(_pre_step))
    _handles.append(register_optimizer_step_post_hook(_post_step))
    _original_next = _BaseDataLoaderIter.__next__
    _BaseDataLoaderIter.__next__ = _next_recording
    log.info("simigrad: SIMIGRAD=1, adaptive batching of every optimizer's step (simigrad_compile.integrations.auto_loop)")


def uninstall() -> None:
    global _original_next
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    while _handles:
        _handles.pop().remove()
    if _original_next is not None:
        _BaseDataLoaderIter.__next__ = _original_next
        _original_next = None
    _windows.clear()
    _fetched.update(declared=None, measured=None)


def exclude(optimizer: torch.optim.Optimizer) -> None:
    """Leave ``optimizer`` alone (for optimizers that ``AdaptiveBatching`` already drives)."""
    _excluded.add(optimizer)


def history(optimizer: torch.optim.Optimizer) -> List[dict]:
    """One record per real optimizer step of ``optimizer``."""
    window = _windows.get(optimizer)
    return list(window.history) if window else []


def _next_recording(self):
    batch = _original_next(self)
    sampler = self._index_sampler if self._auto_collation else None
    _fetched["declared"] = getattr(sampler, "batch_size", None)
    _fetched["measured"] = _measure(batch)
    return batch


def _measure(batch) -> Optional[int]:
    dim = _config.batch_dim if isinstance(_config.batch_dim, int) else 0
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[dim]) if leaf.dim() > dim else None
    return None


def _start(optimizer: torch.optim.Optimizer) -> _Window:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                "simigrad: SIMIGRAD=1 adaptive batching of a plain training loop supports one process only "
                "(ranks would have to agree on every decision); use simigrad_compile.AdaptiveBatching, or unset SIMIGRAD"
            )
    micro = _fetched["declared"] or _fetched["measured"] or _config.batch_size
    if micro is None:
        raise RuntimeError(
            "simigrad: SIMIGRAD=1 needs the micro-batch size: no DataLoader batch was fetched before the first "
            "optimizer.step(); set SIMIGRAD_BATCH_SIZE to the batch size your loop feeds"
        )
    controller = BatchSizeController(_config, _config.batch_size or micro)
    window = _Window(controller, micro, _plan(controller.batch_size, micro))
    log.info("simigrad: %s: micro-batch %d, B0 %d, first window %d x %d", type(optimizer).__name__, micro,
             controller.initial_batch_size, window.accumulation, micro)
    return window


def _plan(target: int, micro: int) -> int:
    """Accumulation count nearest ``target / micro``, moved inside the bounds when a multiple fits."""
    k = max(1, math.floor(target / micro + 0.5))
    while k > 1 and k * micro > _config.max_batch_size:
        k -= 1
    while k * micro < _config.min_batch_size and (k + 1) * micro <= _config.max_batch_size:
        k += 1
    return k


def _params(optimizer: torch.optim.Optimizer) -> List[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _pre_step(optimizer, args, kwargs) -> None:
    if optimizer in _excluded:
        return
    if kwargs.get("closure") is not None or len(args) > 1:
        raise RuntimeError(
            f"simigrad: SIMIGRAD=1 cannot accumulate {type(optimizer).__name__}.step(closure): the closure "
            "recomputes gradients inside the step; unset SIMIGRAD for this script"
        )
    window = _windows.get(optimizer)
    if window is None:
        window = _windows[optimizer] = _start(optimizer)
    n = _fetched["measured"] or _fetched["declared"] or window.micro
    weight = n / window.micro
    half = 0 if window.seen < window.accumulation // 2 else 1
    window.seen += 1
    window.window_samples += n
    if window.accumulation > 1:
        _stash(_params(optimizer), window, half, weight)
    if window.seen == window.accumulation:
        _finish(optimizer, window)


def _stash(params, window: _Window, half: int, weight: float) -> None:
    buffers = window.halves[half]
    window.weights[half] += weight
    for p in params:
        g = p.grad
        if g is None:
            continue
        if p in buffers:
            buffers[p].add_(g, alpha=weight)
        else:
            buffers[p] = g.mul_(weight) if weight != 1.0 else g
        p.grad = None


def _finish(optimizer, window: _Window) -> None:
    params = _params(optimizer)
    backend = gradient_stats(params, reset=True)
    stats = _microstep_stats(params, window) if window.accumulation > 1 else backend
    d, a, b, mode, cosine = stats.dot, stats.sq_norm_1, stats.sq_norm_2, stats.mode, stats.cosine
    if window.accumulation == 1 and mode == "none" and window.min_accumulation == 1:
        window.min_accumulation = 2
        log.warning("simigrad: no split statistics from a compiled backward for %s's parameters (is the model "
                    "compiled? torch.compile(model) under SIMIGRAD=1 does it); from now on every step accumulates "
                    ">= 2 micro-batches so that the microsteps statistics exist", type(optimizer).__name__)
    realised = window.accumulation * window.micro
    target = window.controller.batch_size
    lr_scale = window.controller.lr_scale(realised)
    decision = window.controller.update(cosine)
    window.steps += 1
    window.samples += window.window_samples
    record = {
        "step": window.steps, "samples": window.samples, "target_batch_size": target, "batch_size": realised,
        "micro_batch_size": window.micro, "accumulation": window.accumulation, "cosine": cosine,
        "lr_scale": lr_scale, "skipped": decision.skipped, "mode": mode,
        "next_target_batch_size": decision.batch_size, "dot": d, "sq_norm_1": a, "sq_norm_2": b,
    }
    window.history.append(record)
    log.info("simigrad step %d: cos %.4f (%s) batch %d = %d x %d, lr x%.4f%s; next target %d", window.steps,
             cosine, mode, realised, window.accumulation, window.micro, lr_scale,
             f", skipped ({decision.skipped})" if decision.skipped else "", decision.batch_size)
    if lr_scale != 1.0:
        window.saved_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * lr_scale
    window.accumulation = max(window.min_accumulation, _plan(decision.batch_size, window.micro))
    window.seen, window.window_samples, window.weights = 0, 0, [0.0, 0.0]
    window.halves = [{}, {}]


def _post_step(optimizer, args, kwargs) -> None:
    window = _windows.get(optimizer)
    if window is None or window.saved_lrs is None:
        return
    for group, lr in zip(optimizer.param_groups, window.saved_lrs):
        group["lr"] = lr
    window.saved_lrs = None


def _microstep_stats(params, window: _Window):
    """Sets each ``.grad`` to the window's mean gradient; returns the statistics of the halves' mean gradients."""
    first, second = window.halves
    w1, w2 = window.weights
    touched = [p for p in params if p in first or p in second]
    own = [first[p] if p in first else torch.zeros_like(second[p]) for p in touched]
    other = [second[p] if p in second else torch.zeros_like(first[p]) for p in touched]
    if own:
        rows = pair_stats(own, other, 1.0, 0.0).detach().to("cpu", torch.float64).sum(0)
        d, a, b = float(rows[0]) / (w1 * w2), float(rows[1]) / (w1 * w1), float(rows[2]) / (w2 * w2)
    else:
        d = a = b = float("nan")
    for p, g1, g2 in zip(touched, own, other):
        p.grad = g2.add_(g1).div_(w1 + w2)
    return SplitStats(d, a, b, "microsteps")
