"""Saving, scaling and restoring the ``lr`` of an optimizer's param groups: the one implementation.

The core multiplies every group's ``lr`` by the step's LR scale around the wrapped optimizer's ``step()`` and
puts the exact original objects back afterwards (a scheduler that writes ``lr`` keeps working; a tensor LR keeps
its identity and gets its value back). A door that must hold an LR schedule over a skipped step saves and
restores the same way (:mod:`simigrad_compile.integrations.schedule`).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

SavedLr = List[Tuple[object, object]]
"""Per param group: the ``lr`` object and, for a tensor ``lr``, a copy of its value."""


def save_lr(optimizer: torch.optim.Optimizer) -> SavedLr:
    """What :func:`restore_lr` needs to put every group's ``lr`` back as it is now.

    Example::

        >>> saved = save_lr(opt); opt.param_groups[0]["lr"] = 5.0; restore_lr(opt, saved)  # doctest: +SKIP
    """
    return [(g["lr"], g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else None) for g in optimizer.param_groups]


def scale_lr(optimizer: torch.optim.Optimizer, scale: float) -> SavedLr:
    """Multiply every param group's ``lr`` by ``scale`` (a tensor ``lr`` in place); returns :func:`save_lr`'s
    value from before, for :func:`restore_lr`."""
    saved = save_lr(optimizer)
    for group in optimizer.param_groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr.mul_(scale)
        else:
            group["lr"] = lr * scale
    return saved


def restore_lr(optimizer: torch.optim.Optimizer, saved: SavedLr) -> None:
    """Put back the exact ``lr`` objects of ``saved`` (a tensor ``lr`` keeps its identity, gets its value back)."""
    for group, (lr, value) in zip(optimizer.param_groups, saved):
        if value is not None:
            lr.copy_(value)
        group["lr"] = lr


__all__ = ["SavedLr", "restore_lr", "save_lr", "scale_lr"]
