"""The front doors, each a thin adapter over the runtime core (``docs/doors.md``).

* :mod:`.autoload`: what ``SIMIGRAD=1`` does at ``import torch``; :mod:`.auto_loop`: adaptive batching of an
  unmodified loop under ``SIMIGRAD=1``;
* :mod:`.hf`: ``SimigradTrainer``, a Hugging Face ``Trainer`` (needs ``transformers`` and ``accelerate``);
* :mod:`.lightning`: ``SimigradCallback``, a Lightning ``Callback`` (needs ``lightning``);
* :mod:`.batches`, :mod:`.schedule`: what more than one door needs (a batch's sample count; an LR schedule held
  over a skipped step).

The hand-written loop's door, ``AdaptiveBatching``, is the core itself (``simigrad_compile.runtime.core``).
"""
