"""A run's checkpoint: :class:`CheckpointState` (``run.state_dict()``/``run.load_state_dict()``, mixed into
:class:`~simigrad_compile.runtime.core.StepCore`), and the check of a checkpoint before the core takes any of it:
every key, type and range, the ladder, and the new config's bounds (which win over the checkpoint's plan).
:func:`validated_state` builds fresh objects and changes nothing, so a bad checkpoint leaves the run untouched."""

from __future__ import annotations

import logging
from collections import Counter

from ..config import SimigradConfig
from .controller import BatchSizeController
from .ladder import BatchPlan, Ladder

log = logging.getLogger("simigrad_compile")
STATE_KEYS = ("controller", "ladder", "plan", "epoch", "position", "samples", "steps", "similarity", "history")


def _number(key, value, kind=int, minimum=0):
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"simigrad: checkpoint {key!r} is {value!r}, not a number") from None
    if kind is int and out < minimum:
        raise ValueError(f"simigrad: checkpoint {key!r} is {out}, expected >= {minimum}")
    return out


def validated_state(state: dict, config: SimigradConfig, world_size: int, base_accumulation: int) -> dict:
    """The checkpoint's parts, as new objects (controller, ladder, plan) and checked values."""
    if not isinstance(state, dict):
        raise TypeError(f"simigrad: load_state_dict expects the dict of run.state_dict(), got "
                        f"{type(state).__name__}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise KeyError(f"simigrad: the checkpoint lacks {', '.join(missing)}; it is not a run.state_dict()")
    ladder_keys = {"rungs", "world_size", "min_accumulation"}
    if not isinstance(state["ladder"], dict) or not ladder_keys <= state["ladder"].keys():
        raise ValueError(f"simigrad: checkpoint 'ladder' is {state['ladder']!r}, not a ladder state")
    ladder = Ladder(config, world_size, base_accumulation)
    diff = ladder.mismatch(state["ladder"])
    if diff:
        raise ValueError(f"simigrad: the checkpoint comes from another ladder or world size: {diff}. Resume "
                         "with the same micro_batch_sizes / max_micro_batch_size and world size.")
    min_accumulation = _number("ladder.min_accumulation", state["ladder"]["min_accumulation"], minimum=1)
    ladder.require_accumulation(max(base_accumulation, min_accumulation))
    controller = BatchSizeController(config, config.batch_size)
    controller.load_state_dict(state["controller"])
    plan_state = state["plan"]
    if not isinstance(plan_state, (list, tuple)) or len(plan_state) != 2:
        raise ValueError(f"simigrad: checkpoint 'plan' is {plan_state!r}, expected [micro_batch_size, "
                         "accumulation]")
    micro = _number("plan[0]", plan_state[0], minimum=1)
    acc = _number("plan[1]", plan_state[1], minimum=1)
    if micro not in ladder.sizes():
        raise ValueError(f"simigrad: checkpoint plan micro-batch {micro} is not a size of the ladder ({ladder.rungs}"
                         f"{', or 2 to the top with symbolic_batch' if ladder.any_size else ''})")
    plan = BatchPlan(micro, acc, world_size)
    lo, hi = config.min_batch_size, config.max_batch_size
    clamped = min(max(controller.batch_size, lo), hi)
    if clamped != controller.batch_size or not lo <= plan.batch_size <= hi:
        new_plan = ladder.plan(clamped)
        log.warning("simigrad: the checkpoint's target %d (plan %dx%d, batch %d) lies outside the configured "
                    "bounds [%d, %d]: target clamped to %d, plan %s", controller.batch_size, micro, acc,
                    plan.batch_size, lo, hi, clamped, new_plan)
        controller.batch_size, plan = clamped, new_plan
    history = state["history"]
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ValueError("simigrad: checkpoint 'history' is not a list of records")
    skipped = state.get("skipped_steps", {})
    if not isinstance(skipped, dict):
        raise ValueError("simigrad: checkpoint 'skipped_steps' is not a dict")
    return {
        "controller": controller, "ladder": ladder, "plan": plan,
        "epoch": _number("epoch", state["epoch"]), "position": _number("position", state["position"]),
        "samples": _number("samples", state["samples"]), "steps": _number("steps", state["steps"]),
        "similarity": _number("similarity", state["similarity"], float),
        "history": history, "skipped_steps": {str(k): int(v) for k, v in skipped.items()},
        "batch_stats_seen": bool(state.get("batch_stats_seen", False)),
    }




class CheckpointState:
    """The checkpoint half of :class:`~simigrad_compile.runtime.core.StepCore` (its state is the core's)."""

    def state_dict(self) -> dict:
        """The run's state between steps: controller, ladder, plan, stream position, history, skip counts.

        Raises:
            RuntimeError: inside an accumulation window (save after the step's last micro-batch)."""
        w = self.state.window
        if w is not None and (w.done or self._pending is not None):
            raise RuntimeError("simigrad: state_dict() inside an accumulation window; save after the step's last "
                               "run.optimizer.step() (run.sync_gradients is True), or drop the unfinished step "
                               "with run.discard_step() first")
        return {
            "version": 2,
            "controller": self.controller.state_dict(),
            "ladder": self.ladder.state_dict(),
            "plan": [self.plan.micro_batch_size, self.plan.accumulation],
            "epoch": self.state.epoch, "position": self.state.position, "samples": self.state.samples,
            "steps": self.state.steps,
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
        staged = validated_state(state, self.config, self.world_size, self.base_accumulation)
        self.controller, self.ladder, self.plan = staged["controller"], staged["ladder"], staged["plan"]
        self.statistics.ladder = self.ladder
        now = self.state
        now.epoch, now.position = staged["epoch"], staged["position"]
        now.samples, now.steps = staged["samples"], staged["steps"]
        now.target_batch_size = self.controller.batch_size
        self.similarity = staged["similarity"]
        self._history.load_state_dict(staged["history"])
        self.skipped_steps = Counter(staged["skipped_steps"])
        self.statistics.batch_seen = staged["batch_stats_seen"]
        now.window = None
        self._reset_step()
        now.sync_gradients = self.plan.accumulation == 1


__all__ = ["CheckpointState", "STATE_KEYS", "validated_state"]
