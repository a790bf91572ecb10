"""Test-only opaque ops around the real statistics entry points, so that compiled graphs can call them (as
``simigrad::split_grads`` does in the backend); importing this module registers ``torch.ops.simigrad_test.*``."""

from typing import List, Tuple

import torch

from simigrad_compile import kernels


@torch.library.custom_op("simigrad_test::split_stats_sum", mutates_args=())
def split_stats_sum(g1: List[torch.Tensor], g2: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    return kernels.split_stats_sum(list(g1), list(g2))


@split_stats_sum.register_fake
def _(g1, g2):
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in g1]
    return out, torch.empty(len(g1), 3, dtype=torch.float32, device=g1[0].device if g1 else "cpu")


@torch.library.custom_op("simigrad_test::pair_stats", mutates_args=())
def pair_stats(own: List[torch.Tensor], total: List[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    return kernels.pair_stats(list(own), list(total), alpha, beta)


@pair_stats.register_fake
def _(own, total, alpha, beta):
    return torch.empty(len(own), 3, dtype=torch.float32, device=own[0].device if own else "cpu")
