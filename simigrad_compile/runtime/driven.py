"""Which optimizers a step core drives: global step hooks (``SIMIGRAD=1``'s) leave those alone.

Kept apart from :mod:`simigrad_compile.runtime.core` so that the ``SIMIGRAD=1`` hooks, installed at the end of
``import torch``, can ask without importing the runtime.
"""

from __future__ import annotations

import weakref

_DRIVEN: "weakref.WeakSet" = weakref.WeakSet()


def driven(optimizer) -> bool:
    """True when a :class:`~simigrad_compile.runtime.core.StepCore` (or another door) drives ``optimizer``: its
    ``step()`` calls are already that door's, and a global hook must not count them a second time."""
    return optimizer in _DRIVEN


def mark_driven(optimizer) -> None:
    """Count ``optimizer`` as driven (:func:`driven`); every core marks the optimizer it is given."""
    _DRIVEN.add(optimizer)


__all__ = ["driven", "mark_driven"]
