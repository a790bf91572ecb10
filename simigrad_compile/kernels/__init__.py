"""Fused split-group statistics: ``(d, a, b) = (x.y, |x|^2, |y|^2)`` in fp32, plus the sum or mean written once.

It imports without triton; the Triton launchers live in ``triton_stats`` (CUDA),
the Inductor-generated CPU loops in ``inductor_stats``, the torch-op path in ``torch_stats``.
"""

from .ops import HAS_TRITON, pair_stats, shard_stats_mean, split_stats_sum

__all__ = ["HAS_TRITON", "pair_stats", "shard_stats_mean", "split_stats_sum"]
