"""What ``SimigradTrainer`` accepts and refuses of the Trainer's sharded strategies (FSDP, DeepSpeed), with reasons.

FSDP2 (``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``, version 2 being the default of
transformers 5.25, or ``accelerate launch --use_fsdp --fsdp_version 2``) runs: the Trainer's accelerate wraps the
model with ``fully_shard``, the door builds its core on that root (``trainer.model_wrapped``), and the core installs
the split reduce-scatter on every unit (``enable_fsdp``) and turns FSDP's gradient sync off for every micro-batch
but the step's last (``set_requires_gradient_sync``), so FSDP communicates once per step.

Refused, each with its reason (:func:`sharding_problems`):

* FSDP requested but not enabled. accelerate 1.16 gives the FSDP plugin only to accelerator devices: on CPU
  (``use_cpu=True``, a ``MULTI_CPU`` state) ``AcceleratorState`` drops it and the plain Trainer trains with DDP
  without a word; the door says so instead of training another strategy than the one asked for.
* FSDP1 (``fsdp_config={"version": 1}``): its flat-parameter reduction has no custom reduce-scatter to replace.
* DeepSpeed: its engine keeps the accumulation window (its own ``gradient_accumulation_steps`` boundary) and, under
  ZeRO-1/2, moves the gradients into its own partitioned buffers (``p.grad`` is None after the boundary's
  backward), so the core can neither hold the window nor read and scale the step's mean gradient.
* ``resume_from_checkpoint`` under FSDP: the Trainer reloads sharded model and optimizer state through its own
  FSDP paths, which the door's exact-resume check does not cover.
"""

from __future__ import annotations

import os
from typing import Any, List

CPU_FSDP = ("TrainingArguments(fsdp=...) without FSDP: accelerate enables FSDP only on accelerator devices (with "
            "use_cpu=True its AcceleratorState drops the FSDP plugin and the plain Trainer would train with DDP); "
            "drop fsdp/fsdp_config to train with the Trainer's DDP on CPU, or for FSDP2 on CPU/gloo use "
            "fully_shard + AdaptiveBatching in a hand-written loop (docs/distributed.md#fsdp2)")
FSDP1 = ("FSDP1 (fsdp_config version 1): its flat-parameter reduction cannot take the split reduce-scatter; set "
         "fsdp_config={'version': 2}")
DEEPSPEED = ("DeepSpeed: its engine holds the accumulation window itself and keeps ZeRO gradients in its own "
             "partitioned buffers (p.grad is None after the step's backward), so the step's mean gradient cannot be "
             "read or scaled; use the Trainer's DDP or FSDP2 (fsdp_config={'version': 2})")
FSDP_RESUME = ("resume_from_checkpoint under FSDP (the Trainer reloads sharded state through its own FSDP paths, "
               "which the exact-resume check does not cover); resume without FSDP or start a new run")


def fsdp_requested(args: Any) -> bool:
    """The user asked for FSDP: ``TrainingArguments(fsdp=...)`` or ``accelerate launch --use_fsdp``."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version(trainer: Any) -> int:
    """The FSDP version accelerate runs (``trainer.is_fsdp_enabled``)."""
    return int(getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1))


def sharding_problems(trainer: Any) -> List[str]:
    """The refusals of the module docstring that apply to ``trainer`` (a ``transformers.Trainer``)."""
    problems = []
    if trainer.is_deepspeed_enabled:
        problems.append(DEEPSPEED)
    if trainer.is_fsdp_enabled and fsdp_version(trainer) != 2:
        problems.append(FSDP1)
    elif not trainer.is_fsdp_enabled and fsdp_requested(trainer.args):
        problems.append(CPU_FSDP)
    return problems


def resume_problems(trainer: Any, resume_from_checkpoint: Any) -> List[str]:
    """The refusal of a resume under FSDP (``resume_from_checkpoint`` set, or True for the last checkpoint)."""
    return [FSDP_RESUME] if resume_from_checkpoint not in (None, False) and trainer.is_fsdp_enabled else []


__all__ = ["CPU_FSDP", "DEEPSPEED", "FSDP1", "FSDP_RESUME", "fsdp_requested", "fsdp_version", "resume_problems",
           "sharding_problems"]
