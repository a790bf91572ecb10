"""Bytes each rank sends, counted per collective call with the bandwidth-optimal (ring) formulas.

While :meth:`Traffic.counting` is active, the ``torch.distributed`` collectives called through the module
attributes (``dist.all_reduce(...)``: our hook, DDP's Python ``allreduce_hook``, the benchmark's baseline) are
wrapped. For a group of ``h`` ranks and ``B`` tensor bytes, one rank sends:

=========================  =====================
all_reduce                 ``2 B (h-1)/h``
reduce_scatter_single      ``B_in (h-1)/h``  (also ``_tensor``)
all_gather_single          ``B_out (h-1)/h`` (also ``_into_tensor``)
all_gather (list)          ``B (h-1)``
broadcast                  ``B (h-1)/h`` (pipelined ring, averaged over ranks)
send / isend               ``B``
=========================  =====================

DDP's built-in C++ all-reduce (no hook) bypasses Python and is not seen: count plain DDP with
``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook``, which runs the same all-reduce.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Callable, Dict, Iterator

import torch
import torch.distributed as dist


def _size(group) -> int:
    return dist.get_world_size(group)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs[name]


_FORMULAS: Dict[str, Callable] = {
    "all_reduce": lambda a, k: 2 * _bytes(_arg(a, k, 0, "tensor")) * (_size(k.get("group")) - 1) / _size(k.get("group")),
    "reduce_scatter_tensor": lambda a, k: _bytes(_arg(a, k, 1, "input")) * (_size(k.get("group")) - 1) / _size(k.get("group")),
    "all_gather_into_tensor": lambda a, k: _bytes(_arg(a, k, 0, "output_tensor")) * (_size(k.get("group")) - 1) / _size(k.get("group")),
    "reduce_scatter_single": lambda a, k: _bytes(_arg(a, k, 1, "input")) * (_size(k.get("group")) - 1) / _size(k.get("group")),
    "all_gather_single": lambda a, k: _bytes(_arg(a, k, 0, "output_tensor")) * (_size(k.get("group")) - 1) / _size(k.get("group")),
    "all_gather": lambda a, k: _bytes(_arg(a, k, 1, "tensor")) * (_size(k.get("group")) - 1),
    "broadcast": lambda a, k: _bytes(_arg(a, k, 0, "tensor")) * (_size(k.get("group")) - 1) / _size(k.get("group")),
    "send": lambda a, k: _bytes(_arg(a, k, 0, "tensor")),
    "isend": lambda a, k: _bytes(_arg(a, k, 0, "tensor")),
}


class Traffic:
    """Bytes sent by this rank (and calls per collective) while :meth:`counting` is active."""

    def __init__(self) -> None:
        self.sent = 0.0
        self.calls: Counter = Counter()
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.sent, self.calls = 0.0, Counter()

    @contextlib.contextmanager
    def counting(self) -> Iterator["Traffic"]:
        originals = {name: getattr(dist, name) for name in _FORMULAS}

        def wrap(name: str, fn: Callable) -> Callable:
            def counted(*args, **kwargs):
                sent = _FORMULAS[name](args, kwargs)
                with self._lock:
                    self.sent += sent
                    self.calls[name] += 1
                return fn(*args, **kwargs)

            return counted

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
