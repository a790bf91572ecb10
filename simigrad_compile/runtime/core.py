"""The runtime step core: one object owns an optimizer step, and every door drives it.

:class:`StepCore` owns the window, the plan, the choice of statistics, the LR scaling, the skip rules, clipping,
the AMP unscale, the history and the checkpoint state; the boundary's rules (``begin_step``, clipping) are in
:mod:`simigrad_compile.runtime.step_rules`. :class:`~simigrad_compile.runtime.adaptive.AdaptiveBatching` is the
hand-written loop's door over it: an optimizer wrapper, a loader, compile settings.

The step contract (DESIGN.md, section 8): an optimizer step applies exactly what the user's plain loop would
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
* ``clip_grad_norm_(max_norm, norm_type)``, ``sync_gradients``, ``state_dict()`` / ``load_state_dict()``.

A door whose user loop calls the optimizer's ``step()`` and ``zero_grad()`` on every micro-batch (the
``SIMIGRAD=1`` hooks) keeps the window's gradients outside ``p.grad`` between micro-steps, so that those calls
act on nothing, and folds each fresh gradient back into them in place (``held.add_(p.grad); p.grad = held``)
before ``micro_step_done``: ``p.grad`` must be the tensor the window saw at its last micro-step.
``tests/test_core_protocol.py`` has that door in 40 lines, checked against the plain loop.

Statistics, per step. On one process a window of >= 2 micro-steps uses the ``microsteps`` split (the backend's
``batch`` sinks are read with ``reset=True`` and ignored for that step). A window of one micro-step uses the
``batch`` statistics of the compiled backward; when it has none (a micro-batch the split pass refused: a tail
of one sample, a shape Dynamo made dynamic) that step has none, the cause is logged and recorded (``note``),
and the next step is split again. Only while the model has *never* recorded ``batch`` statistics (not compiled
with the backend, or every graph refused) the ladder plans >= 2 micro-steps, with a warning naming the cause;
the first ``batch`` statistics seen undo that. Under data parallelism the statistics are the ``ranks`` split.

Non-finite steps. The skip reasons, in the history's ``skipped`` with ``stepped=False``:
``non-finite-loss``, ``non-finite-gradient``, ``non-finite-statistics``, ``amp-overflow``. A step that was
applied can still leave the controller unmoved: ``no-statistics``, ``interval``, ``non-finite-cosine`` (a zero
half: the cosine is undefined although the gradient is finite).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import List, Optional, Sequence

import torch

from ..config import SimigradConfig
from ..stats.gradient_stats import gradient_stats
from ..stats.microsteps import MicrostepStats
from .amp import ScalerBridge
from .checkpoint import validated_state
from .controller import BatchSizeController, step_statistics
from .history import History
from .ladder import Ladder, Plan
from .statistics import StatisticsChoice
from .step_rules import NonFiniteStep, StepRules  # noqa: F401  (NonFiniteStep: its old home)
from .window import Window, optimizer_params

log = logging.getLogger("simigrad_compile")


class StepCore(StepRules):
    """Owns one optimizer step at a time; see the module docstring for the protocol."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: SimigradConfig, *,
                 world_size: int = 1, rank: int = 0, scaler=None):
        if config.batch_size is None:
            raise ValueError("simigrad needs batch_size= (the initial global batch size B0)")
        self.config = config
        self.model = model
        self.inner = optimizer
        self.world_size, self.rank = world_size, rank
        self.controller = BatchSizeController(config, config.batch_size)
        self._base_accumulation = 2 if world_size == 1 and config.group_mode == "microsteps" else 1
        self.ladder = Ladder(config, world_size, min_accumulation=self._base_accumulation)
        self.plan: Plan = self.ladder.plan(self.controller.batch_size)
        self.microsteps = MicrostepStats()
        self._history = History(config.log_dir)
        self.similarity = float("nan")
        self.skipped_steps: Counter = Counter()
        self.amp = ScalerBridge(scaler, self) if scaler is not None else None
        self._window: Optional[Window] = None
        self._pending: Optional[tuple] = None
        """Between ``begin_step`` and ``end_step``: (window, stats, note, reason, lr_scale, grad_norm, loss)."""
        self._epoch = self._position = self._samples = self._steps = 0
        self._loss: Optional[torch.Tensor] = None
        self._clip: Optional[tuple] = None
        self._saved_lr: Optional[list] = None
        self._sync = self.plan.accumulation == 1
        self.statistics = StatisticsChoice(model, self.ladder, world_size, self._base_accumulation)
        self._bucket_views = False

    # --- views ------------------------------------------------------------------------------------------------
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

    @property
    def window_open(self) -> bool:
        """True between a window's first micro-step and its boundary."""
        w = self._window
        return w is not None and 0 < w.done < w.accumulation

    @property
    def sync_gradients(self) -> bool:
        """True on the micro-batch that ends a step (as Accelerate's): set when ``run.dataloader()`` yields it,
        and by every ``step()`` (True after the one that ended a step). A loop without ``run.dataloader()`` sees,
        before the first ``step()`` of a window, the value the previous ``step()`` left."""
        return self._sync

    def _live_params(self) -> List[torch.nn.Parameter]:
        return optimizer_params(self.inner)

    def _param_name(self, param: torch.nn.Parameter) -> str:
        for name, p in self.model.named_parameters():
            if p is param:
                return repr(name)
        return f"of shape {tuple(param.shape)}"

    # --- the window -------------------------------------------------------------------------------------------
    def _new_window(self, sizes: Sequence[int]) -> Window:
        stats = self.microsteps if self.world_size == 1 else None
        self._window = Window(sizes, optimizer_params(self.inner), stats, allow_views=self._bucket_views,
                              name_of=self._param_name, live=self._live_params)
        self._sync = len(sizes) == 1
        return self._window

    def _current_window(self) -> Window:
        if self._pending is not None or (self._window is not None and self._window.complete):
            raise RuntimeError("simigrad: the last step's boundary is not finished (begin_step()/end_step()); "
                               "after an error there, drop it with run.discard_step()")
        if self._window is None:
            self._new_window((self.plan.micro_batch_size,) * self.plan.accumulation)
        return self._window

    def _open_window(self, sizes: Sequence[int]) -> Window:
        """A loader opens each step's window with the sizes it will yield."""
        w = self._window
        if w is not None and (w.done > 0 or self._pending is not None):
            raise RuntimeError(
                f"simigrad: a new step started after {w.done} of {w.accumulation} micro-steps of the last one: "
                "call run.optimizer.step() once per micro-batch, or drop the unfinished step with "
                "run.discard_step() before starting again")
        return self._new_window(sizes)

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
        w = self._window
        if w is None or w.done == w.accumulation or self._pending is not None:
            w = self._current_window()
        if loss is not None:
            self.log_loss(loss)
        w.micro_step_done(samples)
        self._sync = complete = w.done == w.accumulation
        return complete

    def end_window(self) -> bool:
        """The data ran out: the micro-steps done so far form the step. True when there is a step to finish."""
        w = self._window
        if w is None or w.done == 0:
            self._window = None
            return False
        if not w.complete:
            w.truncate()
        self._sync = True
        return True

    def end_step(self) -> None:
        """Finish the boundary: LR restored, one history record, the controller fed, the next step planned."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("simigrad: end_step() without begin_step()")
        if self._saved_lr is not None:
            self.restore_lr()
        w, stats, note, reason, lr_scale, grad_norm, loss_sum = pending
        cosine = stats.cosine
        target = self.controller.batch_size
        samples = w.samples
        realised = samples * self.world_size
        step = step_statistics(stats, w.sizes, w.half, self.world_size,
                               full=realised >= self.ladder.plan(target).batch_size)
        skipped = reason
        if reason is None:
            skipped = "no-statistics" if stats.mode == "none" else self.controller.observe(step).skipped
        self._steps += 1
        self._samples += realised
        self._position += samples
        self.similarity = cosine
        self._history.append({
            "step": self._steps, "samples": self._samples, "target_batch_size": target, "batch_size": realised,
            "micro_batch_size": w.sizes[0], "accumulation": w.accumulation, "statistics": stats.mode,
            "cosine": cosine if math.isfinite(cosine) else math.nan, "signal": step.signal, "noise": step.noise,
            "gns": self.controller.noise_scale, "gain": self.controller.gain(realised), "lr_scale": lr_scale,
            "stepped": reason is None, "skipped": skipped, "grad_norm": grad_norm,
            "loss": loss_sum / samples if self._loss is not None else None, "note": note,
        })
        self._reset_step()
        self.plan = self.ladder.plan(self.controller.batch_size)

    def _reset_step(self) -> None:
        self._window = None
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
        w = self._window
        self.restore_lr()
        if w is None:
            return
        for p in optimizer_params(self.inner) + w.params:
            p.grad = None
        gradient_stats(self.model, reset=True)
        log.info("simigrad: discarded a step after %d of %d micro-steps", w.done, w.accumulation)
        self._reset_step()
        self._sync = self.plan.accumulation == 1

    def _sync_gradients(self, sync: bool) -> None:
        """Called by the loader before each micro-batch: True for the one that ends the step."""
        self._sync = sync

    def _end_epoch(self) -> None:
        self._epoch += 1
        self._position = 0

    # --- checkpoint -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._window is not None and (self._window.done or self._pending is not None):
            raise RuntimeError("simigrad: state_dict() inside an accumulation window; save after the step's last "
                               "run.optimizer.step() (run.sync_gradients is True), or drop the unfinished step "
                               "with run.discard_step() first")
        return {
            "version": 2,
            "controller": self.controller.state_dict(),
            "ladder": self.ladder.state_dict(),
            "plan": [self.plan.micro_batch_size, self.plan.accumulation],
            "epoch": self._epoch, "position": self._position, "samples": self._samples, "steps": self._steps,
            "similarity": self.similarity,
            "history": self._history.state_dict(),
            "skipped_steps": dict(self.skipped_steps),
            "batch_stats_seen": self.statistics.batch_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        """Validate everything, then change everything: a bad checkpoint raises and leaves the run untouched.
        The new config's bounds win over the checkpoint's plan (clamped, logged)."""
        if self.window_open or self._pending is not None:
            raise RuntimeError("simigrad: load_state_dict() inside an accumulation window; call run.discard_step() "
                               "first")
        staged = validated_state(state, self.config, self.world_size, self._base_accumulation)
        self.controller, self.ladder, self.plan = staged["controller"], staged["ladder"], staged["plan"]
        self.statistics.ladder = self.ladder
        self._epoch, self._position = staged["epoch"], staged["position"]
        self._samples, self._steps = staged["samples"], staged["steps"]
        self.similarity = staged["similarity"]
        self._history.load_state_dict(staged["history"])
        self.skipped_steps = Counter(staged["skipped_steps"])
        self.statistics.batch_seen = staged["batch_stats_seen"]
        self._window = None
        self._reset_step()
        self._sync = self.plan.accumulation == 1


__all__ = ["NonFiniteStep", "StepCore"]
