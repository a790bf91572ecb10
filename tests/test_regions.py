"""Whose statistics a compiled backward records, against independent references (two separate half-batch eager
passes in fp64, eager gradients, and torch's own aot_eager backend for what torch refuses).

Per instance (Dynamo shares one graph between two instances of a class), per model, across a sweep that deletes
models; a second backward (retain_graph) and torch.autograd.grad; a backward that raises; one odd batch.
"""

import copy
import gc
import math
import weakref

import pytest
import torch
import torch._functorch.config

import simigrad_compile
from simigrad_testkit.models import MLP, WithBreak, flat_grads, half_reference
from simigrad_compile.stats.compiled_once import check_compiled_once
from simigrad_compile.stats.gradient_stats import _SINKS


def _compile(model, **options):
    return torch.compile(model, backend="simigrad", options={"compiler": "aot_eager", **options})


def _loss(model, x):
    return lambda rows: model(x[rows]).pow(2).mean()


def _assert_matches_halves(stats, model, x, times=1):
    """``stats`` == ``times`` x the (d, a, b) of two separate half-batch eager passes of ``model`` on ``x``."""
    d, a, b, cos = half_reference(model, _loss(model, x), x.shape[0])
    assert stats.mode == "batch" and stats.missing == () and stats.unsplit == {} and stats.reason == "", stats
    assert abs(stats.dot - times * d) <= 1e-4 * times * math.sqrt(a * b), (stats.dot, times * d)
    assert stats.sq_norm_1 == pytest.approx(times * a, rel=1e-4)
    assert stats.sq_norm_2 == pytest.approx(times * b, rel=1e-4)
    assert stats.cosine == pytest.approx(cos, abs=1e-4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_two_instances_of_one_class_keep_their_own_statistics():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    first, second = MLP(), MLP()
    x, y = torch.randn(6, 12), torch.randn(6, 12)
    graphs = counters["stats"]["unique_graphs"]
    c1, c2 = _compile(first), _compile(second)
    c1(x).pow(2).mean().backward()
    c2(y).pow(2).mean().backward()
    assert counters["stats"]["unique_graphs"] - graphs == 1  # Dynamo ran both through one graph
    s1 = simigrad_compile.gradient_stats(c1, reset=True)
    s2 = simigrad_compile.gradient_stats(c2, reset=True)
    _assert_matches_halves(s1, first, x)
    _assert_matches_halves(s2, second, y)


def test_several_models_in_one_process_interleaved():
    torch.manual_seed(1)
    mlp, broken = MLP(), WithBreak()
    x, z = torch.randn(8, 12), torch.randn(7, 12)
    c_mlp, c_broken = _compile(mlp), _compile(broken)
    loss_mlp = c_mlp(x).pow(2).mean()
    loss_broken = c_broken(z).pow(2).mean()
    loss_broken.backward()
    loss_mlp.backward()
    _assert_matches_halves(simigrad_compile.gradient_stats(mlp, reset=True), mlp, x)
    _assert_matches_halves(simigrad_compile.gradient_stats(broken, reset=True), broken, z)


def test_sweep_keeps_nothing_of_deleted_models():
    """Compile, train, delete, compile another instance of the class: each run's statistics are its own, and
    neither the deleted models nor their sinks stay alive (the graph itself stays in Dynamo's cache). Only this
    test's sinks are checked: an earlier test's graph may still sit in Dynamo's cache with its sink."""
    earlier = weakref.WeakSet(_SINKS)
    dead = []
    for seed in range(3):
        torch.manual_seed(seed)
        model, x = MLP(), torch.randn(6, 12)
        compiled = _compile(model)
        compiled(x).pow(2).mean().backward()
        _assert_matches_halves(simigrad_compile.gradient_stats(compiled, reset=True), model, x)
        dead.append((weakref.ref(model), weakref.ref(model.fc1.weight)))
        del model, compiled
        gc.collect()
        assert all(m() is None and p() is None for m, p in dead)
        stale = [s for s in _SINKS if s not in earlier and s.mode == "batch"
                 and any(p is None for _, _, ps in s.groups() for p in ps)]
        assert stale == []


def _assert_two_backwards_match_eager(loss, model, reference, x):
    """``loss`` backward twice (retain_graph) against the eager reference's two backwards; statistics doubled."""
    loss.backward(retain_graph=True)
    loss.backward()
    eager = reference(x).pow(2).mean()
    eager.backward(retain_graph=True)
    eager.backward()
    want = flat_grads(reference)
    assert (flat_grads(model) - want).norm() / want.norm() < 1e-6
    _assert_matches_halves(simigrad_compile.gradient_stats(model, reset=True), model, x, times=2)


def test_retain_graph_second_backward_adds_gradients_and_statistics():
    torch.manual_seed(2)
    model, x = MLP(), torch.randn(8, 12)
    reference = copy.deepcopy(model)
    loss = _compile(model)(x).pow(2).mean()
    _assert_two_backwards_match_eager(loss, model, reference, x)


def test_autograd_grad_gives_the_gradient_and_records_it():
    torch.manual_seed(3)
    model, x = MLP(), torch.randn(8, 12)
    params = list(model.parameters())
    grads = torch.autograd.grad(_compile(model)(x).pow(2).mean(), params)
    assert all(p.grad is None for p in params)
    got = torch.cat([g.double().flatten() for g in grads])
    model(x).pow(2).mean().backward()
    want = flat_grads(model)
    assert (got - want).norm() / want.norm() < 1e-6
    _assert_matches_halves(simigrad_compile.gradient_stats(model, reset=True), model, x)


@pytest.mark.parametrize("backend", ["simigrad", "aot_eager"])
def test_retain_graph_after_a_single_use_backward_is_refused_as_by_torch(backend):
    """A graph whose backward was compiled for single use (donated buffers) refuses a retained backward under
    torch's own backends too; ours says why, and that flipping donated_buffer afterwards does not help."""
    torch.manual_seed(4)
    model, x = MLP(), torch.randn(8, 12)
    compiled = _compile(model) if backend == "simigrad" else torch.compile(model, backend="aot_eager")
    compiled(x).pow(2).mean().backward()
    loss = compiled(x).pow(2).mean()
    match = "donated_buffer = False before the first" if backend == "simigrad" else "donated buffer"
    with pytest.raises(RuntimeError, match=match):
        loss.backward(retain_graph=True)


def test_donated_buffer_flipped_after_compiling_is_refused_not_wrong():
    torch.manual_seed(5)
    model, x = MLP(), torch.randn(8, 12)
    compiled = _compile(model)
    compiled(x).pow(2).mean().backward()
    with torch._functorch.config.patch(donated_buffer=False):
        with pytest.raises(RuntimeError, match="does not undo the donation"):
            compiled(x).pow(2).mean().backward(retain_graph=True)


@torch._functorch.config.patch(donated_buffer=False)
def test_without_donated_buffers_retained_backwards_are_exact():
    torch.manual_seed(6)
    model, x = MLP(), torch.randn(8, 12)
    reference = copy.deepcopy(model)
    compiled = _compile(model)
    compiled(x).pow(2).mean().backward()  # the backward compiles for single use: nothing is donated
    model.zero_grad()
    simigrad_compile.reset_stats(model)
    loss = compiled(x).pow(2).mean()
    _assert_two_backwards_match_eager(loss, model, reference, x)


def test_a_backward_that_raises_leaves_no_region_behind(monkeypatch, caplog):
    torch.manual_seed(7)
    model, other, x = MLP(), MLP(), torch.randn(6, 12)
    # the separate form: its one split_grads launch is where the failure is injected, before anything records
    options = {"stats_sum": "kernel", "split_contraction": "separate"}
    compiled, compiled_other = _compile(model, **options), _compile(other, **options)
    compiled(x).pow(2).mean().backward()
    simigrad_compile.reset_stats(model)
    model.zero_grad()

    import simigrad_compile.kernels as kernels

    real = kernels.split_stats_sum

    def broken(g1, g2):
        raise ValueError("injected failure inside the compiled backward")

    monkeypatch.setattr(kernels, "split_stats_sum", broken)
    with pytest.raises(ValueError, match="injected failure"):
        compiled(x).pow(2).mean().backward()
    monkeypatch.setattr(kernels, "split_stats_sum", real)

    rows = torch.ones(1, 3)
    with caplog.at_level("WARNING", logger="simigrad_compile"):
        torch.ops.simigrad.record_stats(rows, [0])  # outside any backward: dropped, not recorded into `model`
    assert "outside a compiled region's backward" in caplog.text
    assert simigrad_compile.gradient_stats(model).mode == "none"

    compiled_other(x).pow(2).mean().backward()
    _assert_matches_halves(simigrad_compile.gradient_stats(other, reset=True), other, x)
    model.zero_grad()
    compiled(x).pow(2).mean().backward()
    _assert_matches_halves(simigrad_compile.gradient_stats(model, reset=True), model, x)


def test_one_odd_batch_affects_one_read():
    """A batch of 1 cannot be split: that read says why; the next normal batch records batch statistics again."""
    torch.manual_seed(8)
    model = MLP()
    compiled = _compile(model)
    x, one = torch.randn(8, 12), torch.randn(1, 12)
    compiled(x).pow(2).mean().backward()
    _assert_matches_halves(simigrad_compile.gradient_stats(model, reset=True), model, x)
    model.zero_grad()
    compiled(one).pow(2).mean().backward()
    odd = simigrad_compile.gradient_stats(model, reset=True)
    assert odd.mode == "none" and set(odd.unsplit) == {n for n, _ in model.named_parameters()}
    assert "batch of 1 cannot be halved" in odd.reason and "may not be compiled" not in odd.reason
    text = repr(odd)
    assert "unsplit=6 params (see .unsplit)" in text and text.count("cannot be halved") <= 1
    model.zero_grad()
    compiled(x).pow(2).mean().backward()
    _assert_matches_halves(simigrad_compile.gradient_stats(model, reset=True), model, x)


@pytest.mark.parametrize("dynamic", [None, False])
def test_a_short_batch_in_a_plain_loop(dynamic):
    """A short last batch (5 after 8s): Dynamo's default makes the batch dynamic from then on, and that graph is
    split at floor(B/2) as a SymInt; with dynamic=False the short batch gets its own static graph. Either way
    every read matches the two half-batch passes (2 and 3 samples for the short batch)."""
    torch.manual_seed(9)
    model = MLP()
    compiled = torch.compile(model, backend="simigrad", dynamic=dynamic, options={"compiler": "aot_eager"})
    for i, n in enumerate((8, 5, 8)):
        x = torch.randn(n, 12)
        model.zero_grad()
        compiled(x).pow(2).mean().backward()
        stats = simigrad_compile.gradient_stats(model, reset=True)
        _assert_matches_halves(stats, model, x)


class _Regularised(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.free = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x).pow(2).mean() + self.free.pow(2).sum()  # free's gradient does not scale with the batch


def test_blocks_compiled_one_by_one_are_named_as_in_the_model():
    """Two blocks of one class, each compiled in place: refusals per block, named by their place in the model."""
    model = torch.nn.ModuleList([_Regularised(), _Regularised()])
    for block in model:
        block.compile(backend="simigrad", options={"compiler": "aot_eager"})
    x = torch.randn(6, 4)
    (model[0](x) + model[1](x)).backward()
    stats = simigrad_compile.gradient_stats(model, reset=True)
    assert set(stats.unsplit) == {"0.free", "1.free"} and "does not scale with the batch" in stats.reason
    assert set(stats.missing) == {n for n, _ in model.named_parameters()}


def test_reason_when_nothing_is_compiled():
    model = MLP()
    model(torch.randn(4, 12)).sum().backward()
    stats = simigrad_compile.gradient_stats(model)
    assert stats.mode == "none" and "no graph compiled with backend='simigrad'" in stats.reason


def test_compiling_a_compiled_module_is_named():
    model = MLP()
    twice = torch.compile(_compile(model), backend="simigrad")
    with pytest.raises(TypeError, match=r"torch.compile of an already compiled module.*Compile the model once"):
        simigrad_compile.gradient_stats(twice)
    in_place = MLP()
    in_place.compile(backend="simigrad", options={"compiler": "aot_eager"})
    with pytest.raises(RuntimeError, match=r"MLP is compiled more than once.*Compile the model once"):
        simigrad_compile.gradient_stats(torch.compile(in_place, backend="inductor"))
    nested = MLP()
    nested.fc1 = torch.compile(nested.fc1, backend="simigrad")
    with pytest.raises(RuntimeError, match=r"compiled more than once.*OptimizedModule 'fc1'"):
        check_compiled_once(torch.compile(nested, backend="simigrad"))
    assert check_compiled_once(_compile(model)) is model
    assert simigrad_compile.gradient_stats(in_place).mode == "none"  # compiled once, in place: fine
    with pytest.raises(RuntimeError, match="compiled more than once"):  # also once the inner one was read
        simigrad_compile.gradient_stats(torch.compile(in_place, backend="inductor"))
