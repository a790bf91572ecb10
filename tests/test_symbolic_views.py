"""The split pass's strided views over a symbolic batch (``symbolic_batch``'s mark): ``as_strided`` and
``as_strided_scatter`` are followed with the batch a symbol, each step split like two separate half-batch passes,
one graph for every batch size."""

import pytest
import torch
import torch.nn as nn

import simigrad_compile
from simigrad_testkit.models import flat_grads
from simigrad_testkit.split_cases import half_gradients, loss_of
from test_split_rules import assert_split_like_halves


class _GroupNormOneGroup(nn.Module):
    """PoolFormer's norm: ``GroupNorm(1, C)``, whose backward reads the input through ``as_strided``."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 4, 3), nn.GroupNorm(1, 4), nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).flatten(1))


class _WriteThroughView(nn.Module):
    """An in-place write through a view of a batched tensor: functionalized into ``as_strided_scatter``."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.lin(x).clone()
        h.as_strided(h.shape, h.stride()).mul_(2.0)
        return self.head(h).sum(1)


@pytest.mark.parametrize("name", ["group_norm_one_group", "write_through_view"])
def test_strided_views_split_with_a_symbolic_batch(name):
    """``as_strided`` and ``as_strided_scatter`` over a symbolic batch (``symbolic_batch``'s mark): one graph for
    batches of 4, 5 and 7, each split like two separate half-batch passes."""
    from torch._dynamo.utils import counters

    from simigrad_compile.runtime.data import mark_batch

    torch.manual_seed(3)
    model, make = {"group_norm_one_group": (_GroupNormOneGroup(), lambda b: torch.randn(b, 3, 8, 8)),
                   "write_through_view": (_WriteThroughView(), lambda b: torch.randn(b, 5, 6))}[name]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager"})
    mark = mark_batch(0, None, symbolic=True)
    for batch in (4, 5, 7):
        x = mark(make(batch))
        model.zero_grad(set_to_none=True)
        loss_of(compiled(x)).backward()
        got, stats = flat_grads(model), simigrad_compile.gradient_stats(model, reset=True)
        assert_split_like_halves(got, stats, *half_gradients(model, (x,)))
    assert counters["stats"]["unique_graphs"] == 1
