"""The runtime step core: one object owns an optimizer step, and every door drives it.

:class:`StepCore` owns the window, the plan, the choice of statistics, the LR scaling, the skip rules, clipping,
the AMP unscale, the history and the checkpoint state. :class:`AdaptiveBatching` is the hand-written loop's
door over it: an optimizer wrapper, a loader, compile settings.

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

import dataclasses
import logging
import math
import operator
from collections import Counter
from typing import Any, List, Optional, Sequence

import torch

from .. import compat
from ..config import SimigradConfig, from_mapping
from ..stats.gradient_stats import StatsRead, check_compiled_once, gradient_stats
from ..stats.microsteps import MicrostepStats
from .amp import ScalerBridge
from .checkpoint import validated_state
from .controller import BatchSizeController
from .data import AdaptiveLoader
from .history import History
from .ladder import Ladder, Plan
from .statistics import StatisticsChoice
from .optim import AdaptiveOptimizer, restore_lr, scale_lr
from .window import Window, optimizer_params

log = logging.getLogger("simigrad_compile")
EXTRA_RECOMPILES = 8


class NonFiniteStep(FloatingPointError):
    """A step's loss, gradient or statistics are not finite and ``on_non_finite="raise"``."""


def _world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _wide(grads: List[torch.Tensor]) -> List[torch.Tensor]:
    """fp16/bf16 gradients in fp32, for their norms."""
    return [g.float() if g.dtype in (torch.float16, torch.bfloat16) else g for g in grads]


def _to_host(scalars: List[torch.Tensor], sums: Optional[torch.Tensor]) -> List[float]:
    """The 0-d ``scalars``, then the 1-d ``sums``, as host floats (fp32 values are exact as floats). On an
    accelerator in one copy (torch promotes to the widest dtype); on the CPU, where nothing waits, directly."""
    if sums is None and all(map(_IS_CPU, scalars)):
        return [t.item() for t in scalars] if len(scalars) <= 16 else torch.stack(scalars).tolist()
    device = (scalars[0] if scalars else sums).device
    parts = [torch.stack([t.to(device) for t in scalars])] if scalars else []
    parts += [sums.to(device)] if sums is not None else []
    return torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()


_IS_CPU = operator.attrgetter("is_cpu")


def _total(norms: List[float], norm_type: float) -> float:
    """The ``norm_type``-norm of the gradients from their per-tensor norms (``get_total_norm`` takes the
    ``vector_norm`` of the norms), in fp64 on the host. Not finite exactly when a norm is not."""
    if not norms:
        return 0.0
    if norm_type == 2.0:
        return math.hypot(*norms)
    if any(math.isnan(v) for v in norms):
        return math.nan
    top = max(norms)
    if norm_type == math.inf or top == 0.0 or math.isinf(top):
        return top
    return top * math.fsum((v / top) ** norm_type for v in norms) ** (1.0 / norm_type)


class StepCore:
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
        self._pending: Optional[dict] = None
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
        w = self._current_window()
        if loss is not None:
            self.log_loss(loss)
        w.micro_step_done(samples)
        self._sync = complete = w.complete
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

    # --- clipping ---------------------------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Optional[torch.Tensor]:
        """Clip the step's mean gradient (unscaled) to ``max_norm``, once, at the boundary.

        Call it between ``loss.backward()`` and ``run.optimizer.step()``, on any micro-batch of the step: the
        request holds for the step it is made in. On the micro-batch that ends the step it returns the total
        norm of the step's mean gradient (what ``torch.nn.utils.clip_grad_norm_`` would return in the plain
        loop); before it, None."""
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not math.isfinite(max_norm) or max_norm < 0 or not (norm_type > 0):
            raise ValueError(f"simigrad: clip_grad_norm_ needs a finite max_norm >= 0 and norm_type > 0, got "
                             f"{max_norm}, {norm_type}")
        w = self._current_window()
        self._clip = (max_norm, norm_type)
        if w.done != w.accumulation - 1:
            return None
        factor = (w.divisor / w.samples) / self._amp_scale_now()
        return self._total_norm(w.grads(), norm_type) * factor

    @staticmethod
    def _total_norm(grads: List[torch.Tensor], norm_type: float) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        return torch.nn.utils.get_total_norm(_wide(grads), norm_type)

    def _amp_scale_now(self) -> float:
        if self.amp is None or not self.amp.enabled:
            return 1.0
        return self.amp.current_scale()

    # --- the boundary -----------------------------------------------------------------------------------------
    def begin_step(self) -> bool:
        """Prepare the boundary's optimizer step; False when it must be skipped (module docstring)."""
        w = self._window
        if w is None or not w.complete or self._pending is not None:
            raise RuntimeError("simigrad: begin_step() needs a window whose last micro-step is done "
                               "(micro_step_done() returned True) and no step in progress")
        w.check("the boundary")
        read, note = self.statistics.read(w, self._steps + 1)
        grads = w.grads()
        norm_type = self._clip[1] if self._clip else 2.0
        norms = torch._foreach_norm(_wide(grads), norm_type) if grads else ()
        sums = read.sums if isinstance(read, StatsRead) else None  # the statistics' sums, still on the device
        scalars = [self._loss] + (self.amp.checks() if self.amp is not None else [None] * 3)
        values = _to_host([*norms, *(c for c in scalars if c is not None)], sums)  # the boundary's one host sync
        raw = _total(values[:len(norms)], norm_type)
        rest = iter(values[len(norms):])
        loss_sum, scale, drift, found_inf = [next(rest) if c is not None else default
                                             for c, default in zip(scalars, (0.0, 1.0, 0.0, 0.0))]
        stats = read.result(list(rest) if sums is not None else None) if isinstance(read, StatsRead) else read
        if drift:
            raise RuntimeError("simigrad: the GradScaler's scale changed inside an accumulation window (a "
                               "scaler.update(new_scale) or another optimizer's update mid-window): the micro-"
                               "batches' gradients no longer share a scale. Drop the step with run.discard_step().")
        factor = w.mean_factor / scale
        grad_norm = raw * factor
        if scale != 1.0 and stats.mode != "none":
            s2 = scale * scale
            stats = dataclasses.replace(stats, dot=stats.dot / s2, sq_norm_1=stats.sq_norm_1 / s2,
                                        sq_norm_2=stats.sq_norm_2 / s2)
        reason = None
        if not math.isfinite(loss_sum):
            reason = "non-finite-loss"
        elif self.amp is not None and self.amp.enabled and (found_inf or not math.isfinite(raw)):
            reason = "amp-overflow"
        elif not math.isfinite(raw):
            reason = "non-finite-gradient"
        elif stats.mode != "none" and not stats.finite:
            reason = "non-finite-statistics"
        realised = w.samples * self.world_size
        lr_scale = self.controller.lr_scale(realised)
        self._pending = {"window": w, "stats": stats, "note": note, "reason": reason, "lr_scale": lr_scale,
                         "grad_norm": grad_norm if math.isfinite(grad_norm) else float("nan"), "loss": loss_sum}
        if reason is not None:
            return self._skip(w, reason)
        if self._clip is not None:
            factor *= min(1.0, self._clip[0] / (grad_norm + 1e-6))
        if factor != 1.0 and grads:
            torch._foreach_mul_(grads, factor)
        self._saved_lr = scale_lr(self.inner, lr_scale) if lr_scale != 1.0 else None  # 1.0: lr untouched
        return True

    def _skip(self, w: Window, reason: str) -> bool:
        self.skipped_steps[reason] += 1
        count = sum(self.skipped_steps.values())
        if self.config.on_non_finite == "raise" and reason != "amp-overflow":
            self._pending = None
            raise NonFiniteStep(f"simigrad: step {self._steps + 1}: {reason} (on_non_finite='raise'). Drop the step "
                                "with run.discard_step() to go on, or use on_non_finite='skip'.")
        level = logging.INFO if reason == "amp-overflow" else logging.WARNING
        log.log(level, "simigrad: step %d skipped (%s): parameters, optimizer state and LR schedule untouched; "
                "%d skipped step(s) so far", self._steps + 1, reason, count)
        for p in w.params:
            p.grad = None
        return False

    def restore_lr(self) -> None:
        """Put back the exact ``lr`` objects after ``begin_step`` (``end_step`` and ``discard_step`` do it)."""
        if self._saved_lr is not None:
            restore_lr(self.inner, self._saved_lr)
            self._saved_lr = None

    def end_step(self) -> None:
        """Finish the boundary: LR restored, one history record, the controller fed, the next step planned."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("simigrad: end_step() without begin_step()")
        self.restore_lr()
        w, stats = pending["window"], pending["stats"]
        applied = pending["reason"] is None
        cosine = stats.cosine
        target = self.controller.batch_size
        skipped = pending["reason"]
        if applied:
            skipped = "no-statistics" if stats.mode == "none" else self.controller.update(cosine).skipped
        realised = w.samples * self.world_size
        self._steps += 1
        self._samples += realised
        self._position += w.samples
        self.similarity = cosine
        loss = pending["loss"] / w.samples if self._loss is not None else None
        self._history.append({
            "step": self._steps, "samples": self._samples, "target_batch_size": target, "batch_size": realised,
            "micro_batch_size": w.sizes[0], "accumulation": w.accumulation, "statistics": stats.mode,
            "cosine": cosine if math.isfinite(cosine) else float("nan"), "lr_scale": pending["lr_scale"],
            "stepped": applied, "skipped": skipped, "grad_norm": pending["grad_norm"], "loss": loss,
            "note": pending["note"],
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
        """Cut the next step to at most ``samples`` samples (global) by fewer micro-steps of the same rung: the
        last step of a sample budget, so that runs compared on a budget see the same samples. No new graph."""
        if self.window_open:
            raise RuntimeError("simigrad: limit_next_step() inside a step; call it after the step's last micro-batch")
        per_micro = self.plan.micro_batch_size * self.world_size
        if samples < per_micro:
            raise ValueError(f"simigrad: limit_next_step({samples}) is below one micro-batch of the current rung "
                             f"({per_micro} samples)")
        accumulation = min(self.plan.accumulation, samples // per_micro)
        if accumulation < self.plan.accumulation:
            log.info("simigrad: next step cut to %d x %d micro-batches (at most %d samples)",
                     accumulation, self.plan.micro_batch_size, samples)
            self.plan = Plan(self.plan.micro_batch_size, accumulation, self.world_size)

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


class AdaptiveBatching(StepCore):
    """Adaptive batching for a hand-written loop: ``run.optimizer``, ``run.dataloader()``, compile settings.

    Compilation. Rungs compile lazily, on their first micro-batch; :meth:`warm_up` compiles every rung up front.
    Dynamo keeps one graph per rung only if it may hold that many: while the run is open, the runtime raises
    ``torch._dynamo.config.recompile_limit`` to ``len(rungs) + 8`` if it is lower (logged), and :meth:`close`
    (or leaving ``with run:``) puts the old value back.
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


__all__ = ["AdaptiveBatching", "NonFiniteStep", "StepCore"]
