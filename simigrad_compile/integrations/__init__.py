"""The front doors, each a thin adapter over the runtime core (``docs/doors.md``).

* :mod:`.autoload`: what ``SIMIGRAD=1`` does at ``import torch``; :mod:`.auto_loop`: adaptive batching of an
  unmodified loop under ``SIMIGRAD=1``;
* :mod:`.hf`: ``SimigradTrainer``, a Hugging Face ``Trainer`` (needs ``transformers`` and ``accelerate``);
* :mod:`.lightning`: ``SimigradCallback``, a Lightning ``Callback`` (needs ``lightning``);
* :mod:`.batches`, :mod:`.schedule`, :mod:`.door_rules`: what more than one door needs (a batch's sample count;
  an LR schedule held over a skipped step; the one-rung config, the logged keys, the refusals).

Each door builds an :class:`~simigrad_compile.runtime.adaptive.AdaptiveBatching` (the step core, its compile
settings and its loader) and drives the core's documented two-phase protocol (``micro_step_done``,
``begin_step``/``end_step``, ``end_window``, ``close``), reading the step's state from ``run.state``
(:class:`~simigrad_compile.runtime.step_state.StepState`). The hand-written loop's door is ``AdaptiveBatching``
itself, through ``run.optimizer`` and ``run.dataloader()``.
"""
