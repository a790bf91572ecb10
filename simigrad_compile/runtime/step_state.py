"""The public state of a run's optimizer step: what every door and the loader read.

A :class:`~simigrad_compile.runtime.core.StepCore` owns one :class:`StepState` (``run.state``), as Accelerate's
``Accelerator`` owns a ``GradientState``. The core alone writes it, through its protocol (``micro_step_done``,
``begin_step``/``end_step``, ``open_window``, ``set_sync_gradients``, ``finish_epoch``, ``load_state_dict``);
doors and loaders only read it. It answers four questions:

* **Where is the window?** ``micro_step`` of ``micro_steps`` done, ``window_samples`` samples so far;
  ``in_window`` between the first micro-step and the boundary; ``at_boundary`` from the last micro-step's
  ``micro_step_done`` (which returned True) until ``end_step``.
* **What is the plan?** ``plan`` (micro-batch size, accumulation, world size) of the next or current step;
  ``target_batch_size`` (the controller's) and ``batch_size`` (the step's realised, or planned, global batch).
* **Must this backward synchronise?** ``sync_gradients``: True for the micro-batch that ends the step. Under
  data parallelism the backward reduces the gradients (and the ``ranks`` statistics are taken) only then, as
  under ``DistributedDataParallel.no_sync`` for the others.
* **Where is the data?** ``epoch`` (epoch orders finished), ``position`` (this rank's samples trained in the
  current epoch, including what a tail borrowed from the next), ``samples`` (global samples of completed steps),
  ``steps`` (completed optimizer steps, skipped ones included).

Example::

    >>> run = AdaptiveBatching(model, optimizer, batch_size=32)          # doctest: +SKIP
    >>> for batch in run.dataloader(dataset):                            # doctest: +SKIP
    ...     loss = model(batch).mean(); loss.backward()
    ...     if run.state.sync_gradients:                                 # the micro-batch that ends the step
    ...         print(run.state.micro_step + 1, "of", run.state.micro_steps)
    ...     run.optimizer.step(); run.optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Optional

from .ladder import BatchPlan
from .window import Window


class StepState:
    """The step's public state (module docstring). Written by the core only; read it, do not assign it.

    Attributes:
        plan: the :class:`~simigrad_compile.runtime.ladder.BatchPlan` of the next step (of the current one while
            a window is open).
        target_batch_size: the controller's target global batch for the next step.
        window: the open :class:`~simigrad_compile.runtime.window.Window` (micro-batch sizes, progress), or None
            between steps.
        sync_gradients: True on the micro-batch that ends the step (see the module docstring).
        epoch: epoch orders finished.
        position: this rank's samples trained in the current epoch.
        samples: global samples of the completed steps.
        steps: completed optimizer steps (skipped steps included).
        world_size: data-parallel processes.
    """

    __slots__ = ("plan", "target_batch_size", "window", "sync_gradients", "epoch", "position", "samples", "steps",
                 "world_size")

    def __init__(self, plan: BatchPlan, target_batch_size: int, world_size: int = 1):
        self.plan = plan
        self.target_batch_size = target_batch_size
        self.window: Optional[Window] = None
        self.sync_gradients = plan.accumulation == 1
        self.epoch = self.position = self.samples = self.steps = 0
        self.world_size = world_size

    @property
    def micro_step(self) -> int:
        """Micro-steps of the open window done so far (0 between steps)."""
        return self.window.done if self.window is not None else 0

    @property
    def micro_steps(self) -> int:
        """Micro-steps of the open window (planned; fewer where the data ran out), else of the plan."""
        return self.window.accumulation if self.window is not None else self.plan.accumulation

    @property
    def micro_batch_size(self) -> int:
        """Samples (per rank) of the micro-batch whose backward comes next (of the last one at the boundary)."""
        w = self.window
        if w is None:
            return self.plan.micro_batch_size
        return w.sizes[min(w.done, w.accumulation - 1)]

    @property
    def window_samples(self) -> int:
        """Global samples of the open window's micro-steps done so far."""
        w = self.window
        return sum(w.sizes[:w.done]) * self.world_size if w is not None else 0

    @property
    def batch_size(self) -> int:
        """The global batch of the current step (its window's sizes), or of the next one (the plan's)."""
        return self.window.samples * self.world_size if self.window is not None else self.plan.batch_size

    @property
    def in_window(self) -> bool:
        """True between a window's first micro-step and its boundary."""
        w = self.window
        return w is not None and 0 < w.done < w.accumulation

    @property
    def at_boundary(self) -> bool:
        """True from the step's last ``micro_step_done`` until ``end_step`` (or ``discard_step``)."""
        w = self.window
        return w is not None and w.done == w.accumulation

    def __repr__(self) -> str:
        return (f"StepState(micro_step={self.micro_step}/{self.micro_steps}, batch_size={self.batch_size}, "
                f"target={self.target_batch_size}, sync_gradients={self.sync_gradients}, epoch={self.epoch}, "
                f"position={self.position}, steps={self.steps})")


__all__ = ["StepState"]
