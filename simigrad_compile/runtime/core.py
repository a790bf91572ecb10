"""The runtime step core: one object owns an optimizer step, and every door drives it.

:class:`StepCore` owns the window, the plan, the choice of statistics, the LR scaling, the skip rules, clipping,
the AMP unscale, the history and the checkpoint state; the boundary's rules (``begin_step``, clipping) are in
:mod:`simigrad_compile.runtime.step_rules`. :class:`~simigrad_compile.runtime.adaptive.AdaptiveBatching` is the
hand-written loop's door over it: an optimizer wrapper, a loader, compile settings.

The step contract (``docs/loop_rules.md``): an optimizer step applies exactly what the user's plain loop would
apply to the **mean gradient of the step's samples**: after clipping of that mean (if asked), after unscaling
(AMP), or not at all (a non-finite loss, gradient or statistic skips the whole step, as ``GradScaler`` does).
Everything else raises an error that names the cause and the fix.

Protocol (for a door that owns the call to the wrapped optimizer's ``step``)::

    # every micro-batch, after its backward:
    if core.micro_step_done(samples=n, loss=loss):      # True when this micro-batch ends the step
        if core.begin_step():                           # False: the step is skipped (grads dropped)
            optimizer.step()                            # the wrapped optimizer, LR already scaled
        core.end_step()                                 # LR restored, history, controller, next plan

* ``micro_step_done(samples=None, loss=None) -> bool``: counts one micro-step of the open window (opening one
  with the current plan when none is open). ``samples`` is checked against the size the gradient was prepared
  for; a door that learns a micro-batch's size before its backward announces it with
  ``next_micro_batch(samples)`` (any size may come first in a window). ``loss`` (the micro-batch's mean loss,
  a tensor) fills the history's ``loss`` and is checked for finiteness at the boundary.
* ``begin_step() -> bool``: reads the statistics, checks loss, gradient and statistics for inf/NaN (one host
  sync), turns ``p.grad`` into the step's mean gradient, unscales it (AMP), clips it (``clip_grad_norm_``) and
  multiplies every param group's ``lr`` by the LR scale of the realised batch. Returns False when the step must
  be skipped: the gradients are then dropped (``p.grad = None``) and nothing may be stepped. With
  ``on_non_finite="raise"`` it raises instead (then ``discard_step()`` drops the step).
* ``end_step()``: puts back the exact ``lr`` objects, appends the history record, feeds the controller (only
  for a step that was applied and has statistics) and plans the next step.
* ``discard_step()``: drops an open (or failed) window: gradients, loss, clip request, LR; the run goes on
  from the last completed step.
* ``end_window()``: the data ran out inside a window: the micro-steps done so far form the step (returns
  True when there is one; then ``begin_step``/``end_step`` as above).
* ``clip_grad_norm_(max_norm, norm_type)``, ``state_dict()`` / ``load_state_dict()``, ``close()`` (a step left
  open when the run closes is discarded, with a warning that counts its micro-batches: one rule for every door).

The step's state (window position, plan, sync flag, epoch position) is ``core.state``, a
:class:`~simigrad_compile.runtime.step_state.StepState` that doors and loaders read. A loader that yields the
micro-batches itself (``run.dataloader()``) drives the window from the data side with public calls:
``window_sizes(remaining, drop_last)`` (the next step's micro-batch sizes), ``open_window(sizes)``,
``set_sync_gradients(last)`` before each micro-batch, ``finish_epoch(length)`` at the end of a pass.

A door whose user loop calls the optimizer's ``step()`` and ``zero_grad()`` on every micro-batch (the
``SIMIGRAD=1`` hooks) keeps the window's gradients outside ``p.grad`` between micro-steps, so that those calls
act on nothing, and folds each fresh gradient back into them in place (``held.add_(p.grad); p.grad = held``)
before ``micro_step_done``: ``p.grad`` must be the tensor the window saw at its last micro-step.
``tests/test_core_protocol.py`` has that door in 40 lines, checked against the plain loop.

The statistics each step uses: :mod:`simigrad_compile.runtime.statistics`; the skip reasons:
:mod:`simigrad_compile.runtime.step_rules`; the checkpoint: :mod:`simigrad_compile.runtime.checkpoint`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import torch

from ..config import SimigradConfig
from ..stats.gradient_stats import gradient_stats
from ..stats.microsteps import MicrostepStats
from .amp import ScalerBridge
from .checkpoint import CheckpointState
from .controller import BatchSizeController, step_statistics
from .history import History
from .driven import mark_driven
from .coverage import CoverageWarning
from .grad_watch import GradWatch
from .ladder import BatchPlan, Ladder
from .statistics import StatisticsChoice, base_accumulation
from .step_rules import NonFiniteStep, StepRules  # noqa: F401  (re-exported: the core's public exception)
from .step_state import StepState
from .window import Window, optimizer_params

log = logging.getLogger("simigrad_compile")

class StepCore(StepRules, CheckpointState):
    """Owns one optimizer step at a time; see the module docstring for the protocol.

    Args:
        model: the model whose compiled backward records the statistics (or any object with
            ``named_parameters()``, for a door that sees only the optimizer).
        optimizer: the user's optimizer (``core.user_optimizer``); the core scales its LR around its ``step()``.
        config: the run's :class:`~simigrad_compile.config.SimigradConfig`; ``batch_size`` (B0) is required.
        world_size, rank: the data-parallel process group (1, 0 on one process).
        scaler: a ``torch.amp.GradScaler`` whose scale the core holds fixed inside a step.
        bucket_views: DDP's ``gradient_as_bucket_view=True`` may swap ``p.grad`` for a bucket view once per
            window.

    Raises:
        ValueError: ``config.batch_size`` is None.

    Example (a door's protocol; ``AdaptiveBatching`` is the ready-made hand-loop door)::

        core = StepCore(model, optimizer, SimigradConfig(batch_size=32))
        for x, y in batches:                          # micro-batches of core.state.micro_batch_size
            loss = loss_fn(model(x), y)
            loss.backward()
            if core.micro_step_done(samples=len(x), loss=loss):
                if core.begin_step():
                    optimizer.step()
                core.end_step()
                optimizer.zero_grad()
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: SimigradConfig, *,
                 world_size: int = 1, rank: int = 0, scaler=None, bucket_views: bool = False):
        if config.batch_size is None:
            raise ValueError("simigrad needs batch_size= (the initial global batch size B0)")
        self.config = config
        self.model = model
        self.user_optimizer = optimizer
        mark_driven(optimizer)
        self.world_size, self.rank = world_size, rank
        self.controller = BatchSizeController(config, config.batch_size)
        self.base_accumulation = base_accumulation(config, world_size)
        self.ladder = Ladder(config, world_size, min_accumulation=self.base_accumulation)
        self.state = StepState(self.ladder.plan(self.controller.batch_size), self.controller.batch_size, world_size)
        self.microsteps = MicrostepStats()
        self._history = History(config.log_dir if rank == 0 else None)  # one log per run: rank 0 writes it
        self.similarity = float("nan")
        self.skipped_steps: Counter = Counter()
        self.amp = ScalerBridge(scaler, self) if scaler is not None else None
        self.bucket_views = bucket_views
        self.grad_watch = GradWatch() if world_size == 1 and not bucket_views else None  # in-place grad changes
        self.coverage_warning = CoverageWarning()
        self._pending = None
        """Between ``begin_step`` and ``end_step``: the :class:`~simigrad_compile.runtime.step_rules.PendingStep`."""
        self._loss: Optional[torch.Tensor] = None
        self._clip: Optional[tuple] = None
        self._saved_lr: Optional[list] = None
        self.statistics = StatisticsChoice(model, self.ladder, world_size, self.base_accumulation)
        self.grads_held = False  # FSDP2's no-sync keeps a window's gradients outside p.grad (window.py: held)

    # --- views ------------------------------------------------------------------------------------------------
    @property
    def inner(self) -> torch.optim.Optimizer:
        """Deprecated name of :attr:`user_optimizer` (the optimizer the user passed in)."""
        return self.user_optimizer

    @property
    def plan(self) -> BatchPlan:
        """The plan of the next (or current) step: ``state.plan``."""
        return self.state.plan

    @plan.setter
    def plan(self, plan: BatchPlan) -> None:
        self.state.plan = plan

    @property
    def batch_size(self) -> int:
        """The global batch size of the next (or current) optimizer step (``state.batch_size``)."""
        return self.state.batch_size

    @property
    def history(self) -> list:
        """One dict per optimizer step (keys: :data:`simigrad_compile.runtime.history.KEYS`)."""
        return self._history.records

    @property
    def target_batch_size(self) -> int:
        """The controller's target global batch for the next step."""
        return self.controller.batch_size

    @property
    def lr_scale(self) -> float:
        return self.controller.lr_scale(self.batch_size)

    @property
    def epoch(self) -> int:
        """Epoch orders finished (``state.epoch``)."""
        return self.state.epoch

    @property
    def window_open(self) -> bool:
        """True between a window's first micro-step and its boundary (``state.in_window``)."""
        return self.state.in_window

    @property
    def sync_gradients(self) -> bool:
        """True on the micro-batch that ends a step (as Accelerate's): set when ``run.dataloader()`` yields it,
        and by every ``step()`` (True after the one that ended a step). A loop without ``run.dataloader()`` sees,
        before the first ``step()`` of a window, the value the previous ``step()`` left. (``state.sync_gradients``)"""
        return self.state.sync_gradients

    @property
    def params(self) -> List[torch.nn.Parameter]:
        """The parameters the optimizer steps that require a gradient (read live from its param_groups)."""
        return optimizer_params(self.user_optimizer)

    def _live_params(self) -> List[torch.nn.Parameter]:
        return optimizer_params(self.user_optimizer)

    def _param_name(self, param: torch.nn.Parameter) -> str:
        for name, p in self.model.named_parameters():
            if p is param:
                return repr(name)
        return f"of shape {tuple(param.shape)}"

    # --- the window -------------------------------------------------------------------------------------------
    def _new_window(self, sizes: Sequence[int]) -> Window:
        self.state.window = Window(sizes, optimizer_params(self.user_optimizer), self.microsteps if self.world_size == 1
                                   else None, allow_views=self.bucket_views, name_of=self._param_name,
                                   live=self._live_params, watch=self.grad_watch, held=self.grads_held)
        self.state.sync_gradients = len(sizes) == 1
        return self.state.window

    def _current_window(self) -> Window:
        if self._pending is not None or (self.state.window is not None and self.state.window.complete):
            raise RuntimeError("simigrad: the last step's boundary is not finished (begin_step()/end_step()); "
                               "after an error there, drop it with run.discard_step()")
        if self.state.window is None:
            self._new_window((self.plan.micro_batch_size,) * self.plan.accumulation)
        return self.state.window

    # --- the loader's side of the window -----------------------------------------------------------------------
    def window_sizes(self, remaining: int, drop_last: bool = False) -> Tuple[int, ...]:
        """The next step's micro-batch sizes (per rank) with ``remaining`` samples left in the epoch.

        Returns the plan's (``(m,) * k``), or at the epoch's tail ``Ladder.tail_sizes``: the ``remaining``
        samples exactly where one graph runs every size, else the plan's micro-batches that cover them (a loader
        completes the last one from the next epoch); ``()`` when ``drop_last`` drops the tail."""
        m, k = self.plan.micro_batch_size, self.plan.accumulation
        if remaining >= m * k:
            return (m,) * k
        return () if drop_last else self.ladder.tail_sizes(remaining, m)

    def open_window(self, sizes: Sequence[int]) -> Window:
        """Open the next step's window with the micro-batch sizes a loader will yield; returns it.

        Raises:
            RuntimeError: the last step is unfinished (fewer ``step()`` calls than micro-batches)."""
        w = self.state.window
        if w is not None and (w.done > 0 or self._pending is not None):
            raise RuntimeError(
                f"simigrad: a new step started after {w.done} of {w.accumulation} micro-steps of the last one: "
                "call run.optimizer.step() once per micro-batch (the wrapper, not the optimizer passed to "
                "AdaptiveBatching), or drop the unfinished step with run.discard_step() before starting again")
        return self._new_window(sizes)

    def set_sync_gradients(self, sync: bool) -> None:
        """Before each micro-batch: True for the one that ends the step (``state.sync_gradients``). A core with a
        data-parallel reduction (``AdaptiveBatching``) also turns the backward's reduction on or off here."""
        self.state.sync_gradients = sync

    def finish_epoch(self, length: int) -> None:
        """The stream reached the end of the epoch's order of ``length`` samples (per rank): ``state.epoch``
        counts it, and the samples a tail borrowed from the next epoch(s) count as trained there."""
        state = self.state
        over = max(state.position - length, 0)
        state.epoch += 1
        while over >= length > 0:
            state.epoch += 1
            over -= length
        state.position = over

    def next_micro_batch(self, samples: int) -> None:
        """Announce the size of the micro-batch whose backward comes next (a door that does not follow the
        plan's micro-batch size, for example a short last batch)."""
        self._current_window().resize_next(int(samples))

    def log_loss(self, loss) -> None:
        """Record this micro-step's (mean) loss, before its ``run.optimizer.step()``; the step's record holds the
        sample-weighted mean, and a non-finite loss skips the step."""
        w = self._current_window()
        value = loss.detach().reshape(())
        value = (value if value.dtype == torch.float64 else value.float()) * w.sizes[w.done]
        self._loss = value if self._loss is None else self._loss + value

    def micro_step_done(self, samples: Optional[int] = None, loss=None) -> bool:
        """One micro-step's backward is done; True when it ends the step (then ``begin_step``/``end_step``)."""
        w = self.state.window
        if w is None or w.done == w.accumulation or self._pending is not None:
            w = self._current_window()
        if loss is not None:
            self.log_loss(loss)
        w.micro_step_done(samples)
        self.state.sync_gradients = complete = w.done == w.accumulation
        return complete

    def end_window(self) -> bool:
        """The data ran out: the micro-steps done so far form the step. True when there is a step to finish."""
        w = self.state.window
        if w is None or w.done == 0:
            self.state.window = None
            return False
        if not w.complete:
            w.truncate()
        self.state.sync_gradients = True
        return True

    def end_step(self) -> None:
        """Finish the boundary: LR restored, one history record, the controller fed, the next step planned."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("simigrad: end_step() without begin_step()")
        if self._saved_lr is not None:
            self.restore_lr()
        w, stats, reason = pending.window, pending.stats, pending.reason
        cosine = stats.cosine
        target = self.controller.batch_size
        samples = w.samples
        realised = samples * self.world_size
        step = step_statistics(stats, w.sizes, w.half, self.world_size,
                               full=realised >= self.ladder.plan(target).batch_size, form=w.form)
        skipped = reason
        if reason is None:
            skipped = "no-statistics" if stats.mode == "none" else self.controller.observe(step).skipped
        state = self.state
        state.steps += 1
        state.samples += realised
        state.position += samples
        self.similarity = cosine
        self._history.append({
            "step": state.steps, "samples": state.samples, "target_batch_size": target, "batch_size": realised,
            "micro_batch_size": w.sizes[0], "accumulation": w.accumulation, "statistics": stats.mode,
            "cosine": cosine if math.isfinite(cosine) else math.nan, "signal": step.signal, "noise": step.noise,
            "gns": self.controller.noise_scale, "gain": self.controller.gain(realised),
            "lr_scale": pending.lr_scale, "stepped": reason is None, "skipped": skipped,
            "grad_norm": pending.grad_norm, "loss": pending.loss_sum / samples if self._loss is not None else None,
            "note": pending.note, "covered_elements": pending.coverage.elements,
            "covered_sq_norm": pending.coverage.sq_norm,
        })
        self._reset_step()
        self._replan()

    def _replan(self) -> None:
        self.plan = self.ladder.plan(self.controller.batch_size)
        self.state.target_batch_size = self.controller.batch_size

    def _reset_step(self) -> None:
        self.state.window = None
        self._pending = None
        self._loss = None
        self._clip = None
        if self.amp is not None:
            self.amp.reset()

    def limit_next_step(self, samples: int) -> None:
        """Cut the next step to at most ``samples`` samples (global): the last step of a sample budget, so that runs
        compared on a budget see the same samples. Exactly ``samples`` where a plan realises it within the
        accumulation cap, else the largest that fits (call it again for the rest); fewer micro-steps of the current
        rung where they do, else a smaller rung (``Ladder.cut``). Such a step does not steer the controller
        (``short-step``)."""
        if self.window_open:
            raise RuntimeError("simigrad: limit_next_step() inside a step; call it after the step's last micro-batch")
        samples = int(samples)
        if samples >= self.plan.batch_size:
            return
        plan = self.ladder.cut(samples, self.plan)
        if plan is None:
            raise ValueError(f"simigrad: limit_next_step({samples}) is below one micro-batch of the smallest rung "
                             f"({self.ladder.rungs[0] * self.world_size} samples): no step of that size exists; "
                             "add a smaller rung (micro_batch_sizes) or end the budget on the last step")
        log.info("simigrad: next step cut to %d x %d micro-batches (%d samples, at most %d)", plan.accumulation,
                 plan.micro_batch_size, plan.batch_size, samples)
        self.plan = plan

    def discard_step(self) -> None:
        """Drop the open (or failed) step: its gradients, loss, clip request and statistics. The run goes on
        from the last completed step: a new ``for batch in loader`` starts at that step's position."""
        w = self.state.window
        self.restore_lr()
        if w is None:
            return
        for p in optimizer_params(self.user_optimizer) + w.params:
            p.grad = None
        gradient_stats(self.model, reset=True)
        log.info("simigrad: discarded a step after %d of %d micro-steps", w.done, w.accumulation)
        self._reset_step()
        self.state.sync_gradients = self.plan.accumulation == 1

    # --- the end of a run -------------------------------------------------------------------------------------
    def close(self) -> None:
        """End the run: a step left open (the loop stopped inside it) is discarded, with a warning naming its
        micro-batches and samples (they were never applied); the log files are closed. Every door closes this
        way."""
        state = self.state
        if state.in_window:
            log.warning("simigrad: the run ended inside a step; its last %d micro-batch(es) (%d samples) were not "
                        "applied and are discarded", state.micro_step, state.window_samples)
            self.discard_step()
        if self.amp is not None:
            self.amp.close()
        if self.grad_watch is not None:
            self.grad_watch.close()
        self._history.close()

    def plot(self, path: str) -> None:
        """Similarity (with the target line), batch size, LR multiplier and loss against samples (one PNG)."""
        self._history.plot(path, self.config.target_similarity)


__all__ = ["NonFiniteStep", "StepCore"]
