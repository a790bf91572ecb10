"""What the doors that drive a trainer (``SIMIGRAD=1``, Hugging Face, Lightning) share, kept once.

* :func:`one_rung`: a door that does not own the loader adapts the batch through accumulation of the loader's own
  micro-batch: the ladder has that one rung, and B0 defaults to it.
* :data:`LOGGED` / :func:`logged`: the step record's keys a door adds to its trainer's own log.
* :func:`shared_refusals` / :func:`refuse`: what a trainer door cannot run, named with its fix.
"""

from __future__ import annotations

from typing import Any, List, Optional

from ..config import SimigradConfig

LOGGED = ("cosine", "batch_size", "lr_scale")
"""The keys of the core's step record that the Hugging Face and Lightning doors put in their trainer's log."""


def one_rung(config: SimigradConfig, micro_batch_size: int) -> SimigradConfig:
    """``config`` with the one rung ``micro_batch_size`` (the loader's batch) and B0 defaulting to it.

    Example::

        >>> one_rung(SimigradConfig(), 16).micro_batch_sizes, one_rung(SimigradConfig(batch_size=64), 16).batch_size
        ((16,), 64)
    """
    return config.replace(micro_batch_sizes=(micro_batch_size,), batch_size=config.batch_size or micro_batch_size)


def logged(record: dict) -> dict:
    """The :data:`LOGGED` entries of a step record, as floats."""
    return {key: float(record[key]) for key in LOGGED}


def shared_refusals(*, accumulation_option: str, accumulation: int, world_size: int, grad_scaler: Optional[str],
                    self_accumulating: Optional[str]) -> List[str]:
    """The refusals every trainer door makes, worded the same way.

    Args:
        accumulation_option: the trainer's own accumulation option (``gradient_accumulation_steps``, ...).
        accumulation: its value; the run chooses the accumulation, so it must be 1.
        world_size: processes; these doors adapt one process only.
        grad_scaler: the setting that brought a GradScaler (its scale could change inside a window), or None.
        self_accumulating: a strategy that accumulates by itself (DeepSpeed, FSDP), or None.

    Returns:
        One line per problem, each with its fix.
    """
    problems = []
    if accumulation != 1:
        problems.append(f"{accumulation_option}={accumulation}: the run chooses the accumulation; leave it at 1")
    if world_size > 1:
        problems.append(f"world size {world_size}: one process only for now (use AdaptiveBatching with "
                        "enable_ddp)")
    if grad_scaler is not None:
        problems.append(f"{grad_scaler}: its GradScaler could change the scale inside an accumulation window; use "
                        "bf16")
    if self_accumulating is not None:
        problems.append(f"{self_accumulating}, which accumulates by itself")
    return problems


def refuse(door: str, problems: List[Any]) -> None:
    """Raise ``NotImplementedError`` naming every problem of ``door`` at once (nothing when there is none)."""
    if problems:
        raise NotImplementedError(f"simigrad: {door} does not support " + "; ".join(map(str, problems)))


__all__ = ["LOGGED", "logged", "one_rung", "refuse", "shared_refusals"]
