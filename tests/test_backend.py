"""The simigrad backend against independent references: eager gradients, two half-batch passes (fp64)."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import simigrad_compile
from simigrad_testkit.models import MLP, Conv3dNet, GroupedCNN, SeqFirstAttention, TinyGPT, WithBreak, flat_grads, half_reference


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="simigrad", options={"compiler": "aot_eager", **options})


def _check(model, compiled, loss_of, compiled_loss_of, batch_size):
    """Compiled gradient == eager gradient; compiled statistics == the two-half reference."""
    simigrad_compile.reset_stats(model)
    model.zero_grad(set_to_none=True)
    compiled_loss_of(compiled).backward()
    got = flat_grads(model)
    stats = simigrad_compile.gradient_stats(compiled, reset=True)
    model.zero_grad(set_to_none=True)
    loss_of(model, slice(0, batch_size)).backward()
    want = flat_grads(model)
    assert (got - want).norm() / want.norm() < 1e-5, "compiled gradient differs from eager"
    d, a, b, cos = half_reference(model, lambda rows: loss_of(model, rows), batch_size)
    scale = math.sqrt(a * b)
    assert stats.mode == "batch" and stats.missing == ()
    assert abs(stats.dot - d) <= 1e-4 * scale, (stats.dot, d)
    assert stats.sq_norm_1 == pytest.approx(a, rel=1e-4)
    assert stats.sq_norm_2 == pytest.approx(b, rel=1e-4)
    assert stats.cosine == pytest.approx(cos, abs=1e-4)
    return stats


@pytest.mark.parametrize("stats_sum", ["kernel", "graph"])
@pytest.mark.parametrize("batch_size", [8, 7])
def test_mlp(batch_size, stats_sum):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(batch_size, 12), torch.randn(batch_size, 5)
    loss_of = lambda m, rows: F.mse_loss(m(x[rows]), y[rows])  # noqa: E731
    _check(model, _compile(model, stats_sum=stats_sum), loss_of, lambda c: F.mse_loss(c(x), y), batch_size)


@pytest.mark.parametrize("loss_inside", [True, False])
@pytest.mark.parametrize("stats_sum", ["kernel", "graph"])
def test_transformer(loss_inside, stats_sum):
    torch.manual_seed(1)
    model = TinyGPT(loss_inside=loss_inside)
    idx, tgt = torch.randint(0, 40, (6, 8)), torch.randint(0, 40, (6, 8))

    def loss_of(m, rows):
        out = m(idx[rows], tgt[rows])
        return out if loss_inside else F.cross_entropy(out.flatten(0, 1), tgt[rows].flatten())

    _check(model, _compile(model, stats_sum=stats_sum), loss_of, lambda c: loss_of(c, slice(0, 6)), 6)


def test_position_embedding_without_batch_indices():
    torch.manual_seed(9)
    model = TinyGPT(pos_embedding=True)
    idx, tgt = torch.randint(0, 40, (6, 8)), torch.randint(0, 40, (6, 8))
    loss_of = lambda m, rows: m(idx[rows], tgt[rows])  # noqa: E731
    _check(model, _compile(model), loss_of, lambda c: c(idx, tgt), 6)


def test_seq_first_attention_with_batch_dim_1():
    torch.manual_seed(2)
    model, x = SeqFirstAttention(), torch.randn(5, 6, 6)  # (T, B, features)
    loss_of = lambda m, rows: m(x[:, rows]).pow(2).mean()  # noqa: E731
    _check(model, _compile(model, batch_dim=1), loss_of, lambda c: c(x).pow(2).mean(), 6)


def test_grouped_cnn_with_groupnorm():
    torch.manual_seed(3)
    model, x, y = GroupedCNN(), torch.randn(5, 4, 9, 9), torch.randint(0, 3, (5,))
    loss_of = lambda m, rows: F.cross_entropy(m(x[rows]), y[rows])  # noqa: E731
    _check(model, _compile(model), loss_of, lambda c: F.cross_entropy(c(x), y), 5)


def test_conv3d_strided_grouped():
    torch.manual_seed(8)
    model, x = Conv3dNet(), torch.randn(4, 2, 4, 6, 6)
    loss_of = lambda m, rows: m(x[rows]).pow(2).mean()  # noqa: E731
    _check(model, _compile(model), loss_of, lambda c: c(x).pow(2).mean(), 4)


def test_graph_break_regions_add_up():
    torch.manual_seed(4)
    model, x = WithBreak(), torch.randn(6, 12)
    loss_of = lambda m, rows: m(x[rows]).pow(2).mean()  # noqa: E731
    compiled = _compile(model)
    stats = _check(model, compiled, loss_of, lambda c: c(x).pow(2).mean(), 6)
    assert stats.finite


@pytest.mark.parametrize("stats_sum,split_contraction", [("auto", "separate"), ("kernel", "separate"), ("auto", "accumulate")])
def test_inductor_transformer_and_per_parameter_breakdown(stats_sum, split_contraction):
    torch.manual_seed(5)
    model = TinyGPT()
    idx, tgt = torch.randint(0, 40, (4, 8)), torch.randint(0, 40, (4, 8))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="simigrad",
                             options={"stats_sum": stats_sum, "split_contraction": split_contraction})
    loss_of = lambda m, rows: m(idx[rows], tgt[rows])  # noqa: E731
    _check(model, compiled, loss_of, lambda c: c(idx, tgt), 4)
    compiled(idx, tgt).backward()
    stats = simigrad_compile.gradient_stats(model, reset=True, per_parameter=True)
    parts = stats.per_parameter
    assert set(parts) == {n for n, _ in model.named_parameters()}
    assert sum(v[0] for v in parts.values()) == pytest.approx(stats.dot, rel=1e-6, abs=1e-9)
    assert simigrad_compile.gradient_stats(compiled).mode == "none"  # the reset emptied the sinks


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _bn_contributions(model, x, half):
    """g1, g2 for BatchNorm in training mode, by definition: the gradient of the full-batch loss with respect
    to a copy of every parameter used only by the first (second) half's rows. Written out functionally."""
    ps = [{n: p.detach().clone().double().requires_grad_() for n, p in model.named_parameters()} for _ in range(2)]
    x = x.double()
    rows = (slice(0, half), slice(half, x.shape[0]))
    y = torch.cat([F.conv2d(x[r], p["conv.weight"], p["conv.bias"]) for r, p in zip(rows, ps)])
    z = F.batch_norm(y, None, None, training=True, eps=model.bn.eps)
    z = torch.cat([z[r] * p["bn.weight"].view(1, -1, 1, 1) + p["bn.bias"].view(1, -1, 1, 1) for r, p in zip(rows, ps)])
    h = F.relu(z).mean((2, 3))
    out = torch.cat([F.linear(h[r], p["fc.weight"], p["fc.bias"]) for r, p in zip(rows, ps)])
    out.pow(2).mean().backward()
    return [torch.cat([p[n].grad.flatten() for n, _ in model.named_parameters()]) for p in ps]


def test_batchnorm_contributions_add_up():
    torch.manual_seed(6)
    model, x = _BatchNormNet(), torch.randn(7, 3, 6, 6)
    reference = copy.deepcopy(model)
    compiled = _compile(model)
    compiled(x).pow(2).mean().backward()
    stats = simigrad_compile.gradient_stats(model, reset=True)
    g1, g2 = _bn_contributions(reference, x, 3)
    reference(x).pow(2).mean().backward()
    assert (flat_grads(model) - (g1 + g2)).norm() / (g1 + g2).norm() < 1e-5  # g1 + g2 == g
    assert (flat_grads(reference) - (g1 + g2)).norm() / (g1 + g2).norm() < 1e-6
    assert stats.dot == pytest.approx((g1 @ g2).item(), rel=1e-4, abs=1e-4 * (g1.norm() * g2.norm()).item())
    assert stats.sq_norm_1 == pytest.approx((g1 @ g1).item(), rel=1e-4)
    assert stats.sq_norm_2 == pytest.approx((g2 @ g2).item(), rel=1e-4)


class _Regularised(nn.Module):
    """A weight-decay term inside the graph: its gradient does not scale with the batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.free = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x).pow(2).mean() + self.free.pow(2).sum()


def test_unsplittable_parameter_falls_back_by_name():
    torch.manual_seed(7)
    model, x = _Regularised(), torch.randn(6, 4)
    compiled = _compile(model)
    compiled(x).backward()
    got = flat_grads(model)
    model.zero_grad()
    model(x).backward()
    assert torch.allclose(got, flat_grads(model), rtol=1e-6, atol=1e-7)
    stats = simigrad_compile.gradient_stats(compiled, reset=True)
    assert set(stats.unsplit) == {"free"} and "does not scale with the batch" in stats.unsplit["free"]
    assert stats.mode == "none" and math.isnan(stats.cosine) and "does not scale with the batch" in stats.reason
    assert set(stats.missing) == {"fc.weight", "fc.bias", "free"}


def test_forced_batch_mode_raises_with_names():
    model, x = _Regularised(), torch.randn(6, 4)
    with pytest.raises(Exception, match=r"group_mode='batch'.*free: .*does not scale with the batch"):
        _compile(model, group_mode="batch")(x).backward()


def test_batch_of_one_cannot_be_halved():
    model = MLP()
    compiled = _compile(model)
    compiled(torch.randn(1, 12)).sum().backward()
    assert "cannot be halved" in next(iter(simigrad_compile.gradient_stats(model, reset=True).unsplit.values()))


def test_bad_option_names_key_and_valid_ones():
    with pytest.raises(Exception, match=r"unknown simigrad option\(s\) 'group'.*valid options: group_mode"):
        _compile(MLP(), group="batch")(torch.randn(2, 12))
    with pytest.raises(Exception, match=r"'group_mode': bad value 'halves'.*'auto', 'batch'"):
        _compile(MLP(), group_mode="halves")(torch.randn(2, 12))


def _rewritten(monkeypatch, model, x, **options):
    """The backward graph's op counts before and after the pass, and the rewritten graph."""
    from collections import Counter

    from simigrad_compile.compile.passes.manager import SimigradPassManager

    graphs = []
    original = SimigradPassManager.__call__

    def spy(self, graph):
        before = Counter(n.target for n in graph.nodes)
        original(self, graph)
        graphs.append((before, Counter(n.target for n in graph.nodes), graph))

    monkeypatch.setattr(SimigradPassManager, "__call__", spy)
    _compile(model, **options)(x).sum().backward()
    return graphs[-1]


@pytest.mark.parametrize("stats_sum", ["kernel", "graph"])
def test_rewritten_graph_op_counts(monkeypatch, stats_sum):
    """Each weight-gradient mm and bias sum becomes two half-batch ops; none contracts the full batch."""
    aten, model = torch.ops.aten, MLP()
    before, after, graph = _rewritten(monkeypatch, model, torch.randn(8, 12), stats_sum=stats_sum,
                                      split_contraction="separate")
    assert after[aten.mm.default] == before[aten.mm.default] + 3
    assert after[aten.sum.dim_IntList] == before[aten.sum.dim_IntList] + 3
    fused = after[torch.ops.simigrad.split_grads.default]
    assert (fused, after[torch.ops.simigrad.record_stats.default]) == ((1, 0) if stats_sum == "kernel" else (0, 1))
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    contracted = [n.args[0].meta["val"].shape[1] for n in graph.nodes
                  if n.target is aten.mm.default and tuple(n.meta["val"].shape) in weight_shapes]
    assert sorted(contracted) == [4] * 6


@pytest.mark.parametrize("stats_sum", ["kernel", "graph"])
def test_accumulated_graph_op_counts(monkeypatch, stats_sum):
    """``split_contraction="accumulate"``: each weight mm becomes a half-batch mm and an addmm of the other half
    into it (biases keep two sums); the kernel form takes the weights' statistics from pair_stats."""
    aten, model = torch.ops.aten, MLP()
    before, after, graph = _rewritten(monkeypatch, model, torch.randn(8, 12), stats_sum=stats_sum,
                                      split_contraction="accumulate")
    assert after[aten.mm.default] == before[aten.mm.default]
    assert after[aten.addmm.default] == before[aten.addmm.default] + 3  # the forward's linears are addmm too
    assert after[aten.sum.dim_IntList] == before[aten.sum.dim_IntList] + 3
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    weights = [n for n in graph.nodes
               if n.target is aten.addmm.default and tuple(n.meta["val"].shape) in weight_shapes]
    assert [n.args[0].target for n in weights] == [aten.mm.default] * 3
    assert sorted(n.args[1].meta["val"].shape[1] for n in weights) == [4] * 3
    assert sorted(n.args[0].args[0].meta["val"].shape[1] for n in weights) == [4] * 3
    if stats_sum == "kernel":
        assert after[torch.ops.simigrad.pair_stats.default] == 1 and after[torch.ops.simigrad.split_grads.default] == 1


def test_accumulated_kernel_form_on_the_triton_path(monkeypatch):
    """The GPU form of ``split_contraction="accumulate"``: the compiled graph's ``simigrad::pair_stats`` (weights)
    and ``split_grads`` (biases) run the Triton kernels (under TRITON_INTERPRET=1 on CPU)."""
    triton_stats = pytest.importorskip("simigrad_compile.kernels.triton_stats")
    if not triton_stats.INTERPRET:
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    from simigrad_compile.kernels import ops as kernel_ops

    calls = []
    monkeypatch.setattr(kernel_ops, "_path", lambda device: calls.append(device) or triton_stats)
    torch.manual_seed(3)
    model, x, y = MLP(), torch.randn(8, 12), torch.randn(8, 5)
    loss_of = lambda m, rows: F.mse_loss(m(x[rows]), y[rows])  # noqa: E731
    compiled = _compile(model, stats_sum="kernel", split_contraction="accumulate")
    _check(model, compiled, loss_of, lambda c: F.mse_loss(c(x), y), 8)
    assert len(calls) >= 2


def test_low_precision_products_keep_separate_halves(monkeypatch):
    """bf16 weight products do not accumulate: ``g - g1`` would carry bf16's rounding of ``g``."""
    aten, model = torch.ops.aten, MLP().bfloat16()
    before, after, _ = _rewritten(monkeypatch, model, torch.randn(8, 12, dtype=torch.bfloat16),
                                  split_contraction="accumulate")
    assert after[aten.addmm.default] == before[aten.addmm.default]
    assert after[aten.mm.default] == before[aten.mm.default] + 3


def test_parameters_outside_compiled_regions_are_reported(caplog):
    torch.manual_seed(11)
    model = MLP()
    model.fc1 = torch.compile(model.fc1, backend="simigrad", options={"compiler": "aot_eager"})
    model(torch.randn(6, 12)).pow(2).mean().backward()
    with caplog.at_level("WARNING", logger="simigrad_compile"):
        stats = simigrad_compile.gradient_stats(model, reset=True)
    assert stats.mode == "batch" and set(stats.missing) == {"fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}
    assert "fc3.weight" in caplog.text
