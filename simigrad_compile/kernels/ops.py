"""The statistics ops the rest of the code calls (eager functions).

Dispatch by device: Triton launchers on CUDA, Inductor-generated loops on CPU (``inductor_stats``, which hands
tensors of at most ``inductor_stats.SMALL`` elements to the torch-op path ``torch_stats``). Compiled graphs reach
``split_stats_sum`` through the opaque ``simigrad::split_grads`` op and ``pair_stats`` through
``simigrad::pair_stats`` (both in ``compile/ops.py``); statistics readers and the DDP comm hook call
``pair_stats`` and ``shard_stats_mean`` eagerly.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
from torch import Tensor

from . import inductor_stats, torch_stats

log = logging.getLogger("simigrad_compile")

HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _path(device_type: str):
    """The module that implements the ops for ``device_type``."""
    if device_type == "cpu":
        return inductor_stats
    if device_type == "cuda":
        if HAS_TRITON:
            from . import triton_stats

            return triton_stats
        log.warning("simigrad kernels: triton is not installed; using the torch path on cuda (slower)")
        return torch_stats
    raise NotImplementedError(f"simigrad kernels: no implementation for device {device_type!r} (cpu, cuda)")


def split_stats_sum(g1: list[Tensor], g2: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """``g[i] = g1[i] + g2[i]`` (dtype and shape of ``g1[i]``); stats ``[n, 3]`` fp32 rows
    ``(g1.g2, |g1|^2, |g2|^2)``."""
    if not g1 and not g2:
        return [], torch.zeros(0, 3, dtype=torch.float32)
    return _path((g1 or g2)[0].device.type).split_stats_sum(list(g1), list(g2))


def pair_stats(own: list[Tensor], total: list[Tensor], alpha: float, beta: float) -> Tensor:
    """Stats ``[n, 3]`` fp32 rows ``(own.other, |own|^2, |other|^2)`` with ``other = alpha*total + beta*own``
    per element in fp32 (``ranks``: alpha=2, beta=-1; ``microsteps``: alpha=1, beta=-1)."""
    if not own and not total:
        return torch.zeros(0, 3, dtype=torch.float32)
    return _path((own or total)[0].device.type).pair_stats(list(own), list(total), alpha, beta)


def shard_stats_mean(a: Tensor, b: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``mean = (a + b)/2`` in ``a``'s dtype (into ``out``, which may alias ``a``); stats ``[1, 3]`` fp32
    ``(a.b, |a|^2, |b|^2)``. Eager only."""
    return _path(a.device.type).shard_stats_mean(a, b, out)
