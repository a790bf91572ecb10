"""The split pass on the constructs real models use (issue 8): each small module's statistics against two
separate half-batch eager passes in fp64, its gradient against their sum; ops that mix samples are refused."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import simigrad_compile
from simigrad_testkit.models import flat_grads
from simigrad_testkit.split_cases import (Attention, Bag, CellLoop, ChannelsLastHead, ClassToken, Conv, HFPaddingMask, LearnedBias,
                         Linear, OffsetBag, PaddedLabels, PartlyZeroedBias, PositionIds, Recurrent, ShiftRight,
                         WeightNormConv,
                         half_gradients, loss_of)

B = 5


def compile_and_step(model, inputs, compiler="aot_eager", loss=loss_of, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="simigrad", options={"compiler": compiler, **options})
    model.zero_grad(set_to_none=True)
    loss(compiled(*inputs)).backward()
    return flat_grads(model), simigrad_compile.gradient_stats(model, reset=True)


def assert_split_like_halves(got, stats, g1, g2):
    g = g1 + g2
    assert stats.mode == "batch" and not stats.unsplit and stats.missing == (), stats.unsplit
    assert (got - g).norm() / g.norm() < 1e-5, "compiled gradient differs from the sum of the halves"
    assert abs(stats.dot - (g1 @ g2).item()) <= 1e-4 * (g1.norm() * g2.norm()).item()
    assert stats.sq_norm_1 == pytest.approx((g1 @ g1).item(), rel=1e-4)
    assert stats.sq_norm_2 == pytest.approx((g2 @ g2).item(), rel=1e-4)
    assert stats.cosine == pytest.approx(F.cosine_similarity(g1, g2, dim=0).item(), abs=1e-4)


def check(model, inputs, compiler="aot_eager"):
    got, stats = compile_and_step(model, inputs, compiler)
    assert_split_like_halves(got, stats, *half_gradients(model, inputs))


def _image(c=3, size=8):
    return torch.randn(B, c, size, size)


def _tokens(t=7, d=6):
    return torch.randn(B, t, d)


def _keep():
    keep = torch.ones(B, 6)
    keep[1, 4:], keep[3, 2:] = 0, 0
    return keep


INDEX = torch.randint(0, 6, (B, 7, 3))


def conv(f, x=None, channels=3, dims=2):
    return lambda: (Conv(f, channels, dims), (_image() if x is None else x(),))


def linear(f, *rest):
    return lambda: (Linear(f), (_tokens(), *[r() for r in rest]))


def bag(mode, idx=lambda: torch.randint(0, 20, (B, 4)), **kwargs):
    return lambda: (Bag(mode, **kwargs), (idx(), torch.rand(B, 4)))


def pads(h):
    h = F.pad(h, (1, 2, 1, 0), mode="reflect")
    return F.pad(F.pad(h, (0, 1, 1, 0), mode="replicate"), (1, 1, 2, 0), mode="circular")


def patches(h):
    folded = F.fold(F.unfold(h, 2, stride=2) * 2, (8, 8), 2, stride=2)
    return torch.cat([folded.flatten(1), F.unfold(h, 3).flatten(1)], 1)


def scatters(h, i):
    return torch.zeros_like(h).scatter(2, i, h[..., :3]) + torch.zeros_like(h).scatter_add(2, i, h[..., 3:] ** 2)


CASES = {
    # the table
    "hf_padding_mask": lambda: (HFPaddingMask(), (torch.randn(B, 6, 8), _keep())),
    "class_token_cat": lambda: (ClassToken(), (torch.randn(B, 6, 8),)),
    "max_pool_stem": conv(lambda h: F.max_pool2d(h, 3, 2, 1)),
    "constant_pad_labels": lambda: (PaddedLabels(), (torch.randn(B, 6, 4), torch.randint(0, 6, (B, 6)))),
    "slice_assignment_copy": lambda: (ShiftRight(), (torch.randn(B, 6, 4),)),
    "channels_last_adaptive_pool": lambda: (ChannelsLastHead(), (_image(size=7),)),
    "where_learned_bias": lambda: (LearnedBias(), (torch.randn(B, 5, 4),)),
    "position_ids_repeat": lambda: (PositionIds(), (torch.randn(B, 5, 4),)),
    # pooling and their backwards
    "max_pool_indices": conv(lambda h: F.max_pool2d(h, 2, return_indices=True)[0]),
    "max_pool_ceil_3d": conv(lambda h: F.max_pool3d(h, 2, ceil_mode=True), lambda: torch.randn(B, 2, 5, 5, 5), 2, 3),
    "avg_pool": conv(lambda h: F.avg_pool2d(h, 3, 2, 1)),
    "avg_pool_1d": conv(lambda h: F.avg_pool1d(h, 3, 2), lambda: torch.randn(B, 3, 9), 3, 1),
    "adaptive_avg_pool": conv(lambda h: F.adaptive_avg_pool2d(h, 3)),
    "adaptive_max_pool": conv(lambda h: F.adaptive_max_pool2d(h, 3)),
    # resampling, padding, patches, shuffles
    "interpolate_nearest": conv(lambda h: F.interpolate(h, scale_factor=2)),
    "interpolate_bilinear": conv(lambda h: F.interpolate(h, size=(11, 11), mode="bilinear")),
    "interpolate_bicubic_area": conv(lambda h: F.interpolate(F.interpolate(h, scale_factor=1.5, mode="bicubic"),
                                                             size=(4, 4), mode="area")),
    "pad_reflect_replicate_circular": conv(pads),
    "unfold_fold": conv(patches),
    "pixel_shuffle_unshuffle": conv(lambda h: F.pixel_unshuffle(F.pixel_shuffle(h, 2) ** 2, 2)),
    "roll_flip_tensor_unfold": conv(lambda h: torch.roll(h, (1, -2), (2, 3)).flip(1, 3).unfold(3, 3, 2) * 1.5),
    # along non-batch dims
    "gather": linear(lambda h, i: h.gather(2, i), lambda: INDEX),
    "scatter_and_scatter_add": linear(scatters, lambda: INDEX),
    "cumsum": linear(lambda h: h.cumsum(1)),
    "index_select": linear(lambda h: h.index_select(2, torch.tensor([0, 2, 5]))),
    "where": linear(lambda h: torch.where(h > 0, h, h * 0.1)),
    "masked_fill_broadcast_mask": linear(lambda h: h.masked_fill(torch.arange(7)[None, :, None] % 3 == 0, -1.0)),
    "masked_fill_per_sample_mask": linear(lambda h, m: h.masked_fill(m, 0.0), lambda: torch.rand(B, 7, 1) > 0.5),
    "weight_norm": lambda: (WeightNormConv(), (torch.randn(B, 3, 9),)),
    "partly_zeroed_bias": lambda: (PartlyZeroedBias(), (_tokens(),)),
    # embedding bags: one bag per sample (2-D input)
    "embedding_bag_sum": bag("sum"),
    "embedding_bag_mean_padding": bag("mean", lambda: torch.randint(0, 4, (B, 4)) * 5, padding_idx=0),
    "embedding_bag_max": bag("max"),
    "embedding_bag_per_sample_weights": bag("sum", weighted=True),
    # attention
    **{f"sdpa_{kind}": (lambda kind=kind: (Attention(kind), (torch.randn(B, 6, 8), _keep())))
       for kind in ("causal", "bool_broadcast", "additive_broadcast", "bool_per_sample", "additive_per_sample",
                    "expanded", "learned_bias")},
    **{f"sdpa_math_{kind}": (lambda kind=kind: (Attention(kind, math=True), (torch.randn(B, 6, 8), _keep())))
       for kind in ("none", "bool_per_sample", "additive_broadcast")},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_construct_splits_like_two_half_batches(name):
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    check(model, inputs)


ACCUMULATED = ["hf_padding_mask", "class_token_cat", "position_ids_repeat", "sdpa_causal", "gather", "weight_norm"]


@pytest.mark.parametrize("stats_sum", ["graph", "kernel"])
@pytest.mark.parametrize("name", ACCUMULATED)
def test_accumulated_halves_split_like_two_half_batches(name, stats_sum, caplog):
    """``split_contraction="accumulate"`` (``g = addmm(g1, x2^T, dy2)``, statistics from ``(g1, g)``): the
    gradient against the plain ``aot_eager`` backend, the statistics against two fp64 half-batch passes."""
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    with caplog.at_level("INFO", logger="simigrad_compile"):
        got, stats = compile_and_step(model, inputs, split_contraction="accumulate", stats_sum=stats_sum)
    accumulated = [r.args[1] for r in caplog.records if "accumulated by addmm" in r.getMessage()]
    assert accumulated and accumulated[-1] > 0, "no weight gradient took the addmm form"
    assert_split_like_halves(got, stats, *half_gradients(model, inputs))
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    loss_of(torch.compile(model, backend="aot_eager")(*inputs)).backward()
    plain = flat_grads(model)
    assert (got - plain).norm() / plain.norm() < 1e-6


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_offsets_as_the_batched_input(mode):
    """1-D indices cut into bags by offsets: the offsets carry the batch (``batch_dim={"offsets": 0, ...}``)."""
    torch.manual_seed(1)
    model, flat, offsets = OffsetBag(mode), torch.randint(0, 20, (17,)), torch.tensor([0, 3, 4, 9, 12])
    got, stats = compile_and_step(model, (offsets, flat), batch_dim={"offsets": 0, "flat": None})
    halves = []
    for bags, (start, end) in ((slice(0, 2), (0, 4)), (slice(2, 5), (4, 17))):
        ref = OffsetBag(mode).double()
        ref.load_state_dict(model.state_dict())
        (loss_of(ref(offsets[bags] - start, flat[start:end])) * ((bags.stop - bags.start) / 5)).backward()
        halves.append(flat_grads(ref))
    assert_split_like_halves(got, stats, *halves)


def test_inductor_compiles_the_rewritten_constructs():
    """One Inductor compile over the constructs whose rewrites touch indices and strides: position ids (which
    used to fail in Inductor with ``Broadcast failed in ExpandView``), the HF mask, the class token, max-pool."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.positions, self.mask, self.cls = PositionIds(t=6, d=8), HFPaddingMask(), ClassToken()

        def forward(self, x, keep):
            h = self.cls(self.mask(self.positions(x), keep))
            return F.max_pool1d(h.transpose(1, 2), 3, 2, 1)

    torch.manual_seed(2)
    model, inputs = Mixed(), (torch.randn(B, 6, 8), _keep())
    check(model, inputs, compiler="inductor")


MIXING = {
    "cumsum": lambda h: h.cumsum(0),
    "sort": lambda h: h.sort(0).values,
    "topk": lambda h: h.topk(2, 0).values,
    "flip": lambda h: h.flip(0),
    "roll": lambda h: h.roll(1, 0),
    "roll_flattened": lambda h: h.roll(1),
    "cummax": lambda h: h.cummax(0).values,
    "amax": lambda h: h * h.amax(0),
    "max": lambda h: h.max(0).values,
    "global_max": lambda h: h - h.max(),
    "logsumexp": lambda h: h - h.logsumexp(0),
    "prod": lambda h: h.prod(0),
    "softmax": lambda h: h * h.softmax(0),
    "median": lambda h: h.median(0).values,
    "gather": lambda h: h.gather(0, torch.tensor([1, 0, 3, 2, 5, 4])[:, None].expand(6, 4)),
    "index_permutation": lambda h: h[torch.tensor([1, 0, 3, 2, 5, 4])],
    "cross_sample_matmul": lambda h: h @ h.T,
    "diff": lambda h: torch.diff(h, dim=0),
    "pdist": lambda h: F.pdist(h),
}


@pytest.mark.parametrize("name", sorted(MIXING))
def test_ops_that_mix_samples_are_refused(name):
    """Sorting, scanning, permuting or max-reducing along the batch mixes samples: no split, every parameter
    named with the op, and the gradient stays exact."""
    torch.manual_seed(3)
    model, x = Linear(MIXING[name], d=4), torch.randn(6, 4)
    got, stats = compile_and_step(model, (x,))
    model.zero_grad()
    loss_of(model(x)).backward()
    assert (got - flat_grads(model)).norm() / flat_grads(model).norm() < 1e-5
    assert stats.mode == "none" and set(stats.unsplit) == {"fc.weight", "fc.bias"}
    why = stats.unsplit["fc.weight"]
    assert "depends on" in why and ("batch" in why or "samples" in why or "whole tensor" in why), why


def test_a_failing_rewrite_becomes_a_named_refusal(monkeypatch):
    """Reintroduce the position-ids bug (the index side left whole): the pass's own check catches it, undoes the
    rewrite and names the refusal; the compile and the gradient are unaffected."""
    from simigrad_compile.compile.passes import leaf_operands, split_context

    original = leaf_operands.cuts_for

    def index_left_whole(node, info_of):
        how, cuts = original(node, info_of)
        return how, {path: info for path, info in cuts.items() if len(path) == 1}  # drops cuts inside the index list

    monkeypatch.setattr(split_context, "cuts_for", index_left_whole)  # the rewrite's cuts; the analysis keeps its own
    torch.manual_seed(4)
    model, x = PositionIds(), torch.randn(B, 5, 4)
    got, stats = compile_and_step(model, (x,))
    model.zero_grad()
    loss_of(model(x)).backward()
    assert (got - flat_grads(model)).norm() / flat_grads(model).norm() < 1e-6
    assert stats.mode == "none" and set(stats.unsplit) == {n for n, _ in model.named_parameters()}
    assert all("split rewrite failed" in why and "_unsafe_masked_index_put_accumulate" in why
               for why in stats.unsplit.values())
    assert math.isnan(stats.cosine)


def test_dynamic_sequence_length_keeps_batch_statistics_without_extra_graphs():
    """Batches of varying length make Dynamo compile one static graph, then one with a symbolic length; the
    batch stays static, so every step splits, and the simigrad backend compiles no more graphs than a plain
    backend does on the same steps."""
    from torch._dynamo.utils import counters

    from simigrad_testkit.models import TinyGPT

    lengths, batch = [8, 11, 13], 4
    torch.manual_seed(5)
    steps = [(torch.randint(0, 40, (batch, t)), torch.randint(0, 40, (batch, t))) for t in lengths]

    def graphs(backend, **kwargs):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=backend, **kwargs)
        for step, (idx, tgt) in enumerate(steps):
            model.zero_grad(set_to_none=True)
            compiled(idx, tgt).backward()
            if backend == "simigrad":
                got, stats = flat_grads(model), simigrad_compile.gradient_stats(model, reset=True)
                g1, g2 = half_gradients(model, (idx, tgt), loss=lambda loss: loss)
                assert_split_like_halves(got, stats, g1, g2)
        return counters["stats"]["unique_graphs"]

    model = TinyGPT(t=16, pos_embedding=True)
    plain = graphs("aot_eager")
    assert graphs("simigrad", options={"compiler": "aot_eager"}) == plain == 2


RECURRENT = {
    "gru_batch_first": lambda: (Recurrent("GRU"), (torch.randn(4, 3, 3),), (0,), {}),
    "gru_h0_batch_in_dim_1": lambda: (Recurrent("GRU"), (torch.randn(4, 3, 3), torch.randn(1, 4, 6)), (0, 1),
                                      {"batch_dim": {"x": 0, "h0": 1}}),
    "gru_seq_first_two_layers_bidirectional": lambda: (Recurrent("GRU", False, 2, True),
                                                       (torch.randn(3, 4, 3), torch.randn(4, 4, 6)), (1, 1),
                                                       {"batch_dim": 1}),
    "lstm_h0_without_mkldnn": lambda: (Recurrent("LSTM"), (torch.randn(4, 3, 3), torch.randn(1, 4, 6)), (0, 1),
                                       {"batch_dim": {"x": 0, "h0": 1}}),
    "lstm_cell": lambda: (CellLoop("LSTMCell"), (torch.randn(4, 3, 3), torch.randn(4, 6)), (0, 0), {}),
    "gru_cell": lambda: (CellLoop("GRUCell"), (torch.randn(4, 3, 3), torch.randn(4, 6)), (0, 0), {}),
}


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_recurrent_layers_split(name):
    """GRU and LSTM under ``allow_rnn`` with the initial state carrying the batch, and RNN cells. Torch 2.13 fails
    to compile ``nn.LSTM`` on CPU with mkldnn enabled (with any backend), so the LSTM case turns mkldnn off."""
    torch.manual_seed(6)
    model, inputs, dims, options = RECURRENT[name]()
    with torch._dynamo.config.patch(allow_rnn=True), torch.backends.mkldnn.flags(enabled=False):
        got, stats = compile_and_step(model, inputs, **options)
    assert_split_like_halves(got, stats, *half_gradients(model, inputs, dims=dims))


def test_an_initial_state_without_its_batch_dim_is_refused_by_name():
    """Two layers: ``h0`` has 2 entries along its (default) batch dim 0 against the batch of 4."""
    model, inputs = Recurrent("GRU", layers=2), (torch.randn(4, 3, 3), torch.randn(2, 4, 6))
    with torch._dynamo.config.patch(allow_rnn=True):
        got, stats = compile_and_step(model, inputs)
    assert stats.mode == "none"
    assert all("'h0'" in why and "batch_dim" in why for why in stats.unsplit.values()), stats.unsplit


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_an_initial_state_of_one_layer_splits_without_its_batch_dim(kind):
    """``h0`` of shape ``[1, B, H]`` under the default batch dim 0 has 1 entry there: batch-free for the pass
    (a size-1 dim broadcasts), yet exact, because every contraction that lines ``h0`` up with the batch cuts
    it along with the batched operand; checked against half passes that cut ``h0`` along its dim 1."""
    torch.manual_seed(6)
    model, inputs = Recurrent(kind), (torch.randn(4, 3, 3), torch.randn(1, 4, 6))
    with torch._dynamo.config.patch(allow_rnn=True), torch.backends.mkldnn.flags(enabled=False):
        got, stats = compile_and_step(model, inputs)
    assert_split_like_halves(got, stats, *half_gradients(model, inputs, dims=(0, 1)))


def test_aot_eager_max_pool_in_a_fresh_process():
    """Inductor's max-pool decomposition needs ``torch._inductor.lowering`` loaded; a fresh process that only
    asks for ``compiler="aot_eager"`` used to fail with ``module 'torch._inductor' has no attribute 'lowering'``."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, torch.nn as nn, torch.nn.functional as F\n"
        "import simigrad_compile\n"
        "m = nn.Conv2d(3, 4, 3)\n"
        "c = torch.compile(lambda x: F.max_pool2d(m(x), 3, 2, 1), backend='simigrad',\n"
        "                  options={'compiler': 'aot_eager'})\n"
        "c(torch.randn(4, 3, 9, 9)).sum().backward()\n"
        "print('mode', simigrad_compile.gradient_stats(m).mode)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mode batch" in done.stdout


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_symbolic_batch_splits_at_floor_half_with_one_graph(compiler):
    """``dynamic=True`` makes the batch a symbol: the halves are ``floor(B/2)`` and the rest, computed in the
    graph, so one graph serves batches of 4, 5 and 7, each split like two separate half-batch passes. (Under
    Inductor a conv's input halves used to be saved by the forward as views, which failed to compile.)"""
    from torch._dynamo.utils import counters

    torch.manual_seed(7)
    model = Conv(lambda h: F.max_pool2d(h, 2)) if compiler == "inductor" else ShiftRight()
    make = (lambda b: torch.randn(b, 3, 8, 8)) if compiler == "inductor" else (lambda b: torch.randn(b, 6, 4))

    def graphs(backend, options=None):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=backend, dynamic=True, options=options)
        for batch in (4, 5, 7):
            x = make(batch)
            model.zero_grad(set_to_none=True)
            loss_of(compiled(x)).backward()
            if backend == "simigrad":
                got, stats = flat_grads(model), simigrad_compile.gradient_stats(model, reset=True)
                assert_split_like_halves(got, stats, *half_gradients(model, (x,)))
        return counters["stats"]["unique_graphs"]

    ours = graphs("simigrad", {"compiler": compiler})
    assert ours == (1 if compiler == "inductor" else graphs("aot_eager"))  # Dynamo itself specializes B=4 here


@pytest.mark.parametrize("layer", [nn.Embedding, nn.EmbeddingBag])
def test_sparse_embedding_gradients_are_refused_by_name(layer):
    model = nn.Sequential(layer(20, 4, sparse=True), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randint(0, 20, (4, 3)))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager"})
    compiled(torch.randint(0, 20, (4, 3))).pow(2).mean().backward()
    stats = simigrad_compile.gradient_stats(model, reset=True)
    assert stats.mode == "none" and "use sparse=False" in stats.unsplit["0.weight"]


def test_arguments_are_found_by_schema_name_in_every_form_a_graph_passes_them():
    """``op_args`` reads ``output_mask`` (position 10 in ``native_functions.yaml``'s schema) positionally, by
    keyword, and falls back to the schema's default; ``with_argument`` keeps the form the call used."""
    from simigrad_compile.compile.passes.op_args import argument, position, with_argument

    aten = torch.ops.aten
    assert position(aten.convolution_backward.default, "output_mask") == 10
    assert position(aten._embedding_bag_backward.default, "scale_grad_by_freq") == 7
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    positional = graph.call_function(aten.index_put.default, (x, [x], x, True))
    keyword = graph.call_function(aten.index_put.default, (x, [x], x), {"accumulate": True})
    default = graph.call_function(aten.index_put.default, (x, [x], x))
    assert [argument(n, "accumulate") for n in (positional, keyword, default)] == [True, True, False]
    assert with_argument(positional, "accumulate", False) == ((x, [x], x, False), {})
    assert with_argument(default, "accumulate", True) == ((x, [x], x), {"accumulate": True})
    with pytest.raises(KeyError, match="no argument 'bogus'"):
        argument(default, "bogus")

