"""BatchNorm's whole-batch sums, read by its ``grad_input``, are rebuilt from the halves the split pass emits
(``compile/passes/whole_from_halves.py``): gradients still equal the plain model's in fp64, and no third
reduction over the batch is left."""

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import simigrad_compile
from simigrad_testkit.models import flat_grads


class _TwoBatchNorms(nn.Module):
    """Two conv + BatchNorm stages: the second BatchNorm's ``grad_input`` feeds the first stage's gradients."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.c2, self.b2 = nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("batch", [6, 7])
def test_batchnorm_sums_come_from_the_halves_and_gradients_match_fp64(batch, caplog):
    torch.manual_seed(batch)
    model, x = _TwoBatchNorms(), torch.randn(batch, 3, 8, 8)
    y = torch.randint(0, 3, (batch,))
    reference = copy.deepcopy(model).double()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager"})
    with caplog.at_level(logging.INFO, logger="simigrad_compile"):
        F.cross_entropy(compiled(x), y).backward()
    stats = simigrad_compile.gradient_stats(model, reset=True)
    assert stats.mode == "batch" and stats.missing == ()
    # per BatchNorm: sum(dy) and sum(dy * (x - mean)), each read by grad_input as well as by the split gradients
    assert "4 whole-batch contractions rebuilt from their halves" in caplog.text
    F.cross_entropy(reference(x.double()), y).backward()
    want, got = flat_grads(reference), flat_grads(model).double()
    assert (got - want).norm() / want.norm() < 1e-5
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6), name


def test_each_batchnorm_sum_reads_the_activation_once(monkeypatch):
    """``compile/passes/sample_sums.py``: the halves' sums over ``[0, 2, 3]`` come from one per-sample reduction
    over ``[2, 3]`` of the whole-batch summand, never from a slice of the activation itself."""
    from simigrad_compile.compile.passes.split_backward import SplitBackwardPass

    graphs = []
    original = SplitBackwardPass.__call__

    def spy(self, graph):
        original(self, graph)
        graphs.append(graph)

    monkeypatch.setattr(SplitBackwardPass, "__call__", spy)
    torch.manual_seed(0)
    model, x = _TwoBatchNorms(), torch.randn(6, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager"})
    compiled(x).sum().backward()
    assert simigrad_compile.gradient_stats(model, reset=True).mode == "batch"
    aten = torch.ops.aten
    sums = [n for g in graphs for n in g.nodes if n.target is aten.sum.dim_IntList
            and n.args[0].meta["val"].dim() == 4 and n.args[0].meta["val"].shape[0] == 6]
    assert len(sums) >= 4
    assert all(n.args[0].target is not aten.slice.Tensor for n in sums), [str(n.args[0]) for n in sums]
    assert all(sorted(n.args[1]) == [2, 3] for n in sums if n.args[0].meta["val"].shape[2] > 1)
