"""The ``microsteps`` boundary's three paths (fp64 flat, one concatenated call, a call per parameter) each give
the statistics of two separate fp64 half-window passes, the mean gradient, the history's gradient norm and the
non-finite skip. Each path is forced by the size thresholds, on the same model."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import simigrad_compile as sc
from simigrad_compile.runtime.window import Window
from simigrad_compile.stats import microsteps
from simigrad_compile.stats.microsteps import MicrostepStats

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat

PATHS = {"flat_fp64": (1 << 30, 1 << 30), "concat": (0, 1 << 30), "per_parameter": (0, 0)}
"""(FLATTEN, CONCAT) that send every window to one path."""

EXPECTED = {"flat_fp64": {"_pair_flat"}, "concat": {"_pair_concat", "pair_stats"}, "per_parameter": {"pair_stats"}}
"""The functions each path calls (the concatenated one calls the kernel once)."""


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    flatten, concat = PATHS[request.param]
    monkeypatch.setattr(microsteps, "FLATTEN", flatten)
    monkeypatch.setattr(microsteps, "CONCAT", concat)
    taken = []
    for name in ("_pair_flat", "_pair_concat", "pair_stats"):
        real = getattr(microsteps, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            taken.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(microsteps, name, spy)
    return request.param, taken


def _fp64_grad(ref, x, y):
    """The fp64 mean gradient of the plain loop over (x, y), flattened."""
    return torch.cat([g.flatten() for g in ref.mean_grad(x, y)])


def test_each_path_matches_two_fp64_half_passes(path):
    name, taken = path
    torch.manual_seed(0)
    model = Net()
    x, y = dataset(24).tensors
    ref = Reference(model)
    g1, g2, g = _fp64_grad(ref, x[:12], y[:12]), _fp64_grad(ref, x[12:], y[12:]), _fp64_grad(ref, x, y)
    params = list(model.parameters())
    window = Window((6, 6, 6, 6), params, MicrostepStats())
    for j in range(4):
        F.mse_loss(model(x[6 * j:6 * j + 6]), y[6 * j:6 * j + 6]).backward()
        window.micro_step_done()
    stats = window.split_stats()
    window.finish()
    assert taken and set(taken) == EXPECTED[name]
    assert (stats.dot, stats.sq_norm_1, stats.sq_norm_2) == pytest.approx(
        (float(g1 @ g2), float(g1 @ g1), float(g2 @ g2)), rel=2e-5, abs=1e-8)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]).double(), g, rtol=1e-5, atol=1e-7)


def test_each_path_gives_the_history_its_norm_and_cosine(path):
    name, taken = path
    torch.manual_seed(0)
    model = Net()
    x, y = dataset(16).tensors
    ref = Reference(model, "sgd", b0=16)
    norm = ref.grad_norm(x.double(), y.double(), 2.0)
    cosine = ref.cosine([(x[:8].double(), y[:8].double()), (x[8:].double(), y[8:].double())])
    opts = dict(batch_size=16, min_batch_size=16, max_batch_size=16, max_micro_batch_size=8, group_mode="microsteps")
    with sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.1), **opts) as run:
        for j in range(2):
            F.mse_loss(model(x[8 * j:8 * j + 8]), y[8 * j:8 * j + 8]).backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
        rec = run.history[-1]
    assert taken and set(taken) == EXPECTED[name]
    assert rec["statistics"] == "microsteps" and rec["stepped"]
    assert rec["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert rec["cosine"] == pytest.approx(cosine, rel=1e-4, abs=1e-6)


def test_each_path_skips_a_non_finite_gradient(path):
    torch.manual_seed(0)
    model = Net()
    x, y = dataset(8).tensors
    opts = dict(batch_size=8, min_batch_size=8, max_batch_size=8, max_micro_batch_size=4, group_mode="microsteps")
    with sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.1), **opts) as run:
        params = flat(model).clone()
        for j in range(2):
            if j == 1:
                model.fc2.bias.register_hook(lambda g: g * math.nan)
            loss = F.mse_loss(model(x[4 * j:4 * j + 4]), y[4 * j:4 * j + 4])
            loss.backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
        rec = run.history[-1]
    assert not rec["stepped"] and rec["skipped"] in ("non-finite-gradient", "non-finite-statistics")
    assert torch.equal(flat(model), params)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@st.composite
def _gradient_lists(draw):
    """Own (midpoint) and total gradients: 1-6 tensors of 1-3 dims, up to a few thousand elements, of one dtype
    or of mixed dtypes."""
    count = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2 ** 16))
    one = draw(st.sampled_from(_DTYPES)) if draw(st.booleans()) else None
    gen = torch.Generator().manual_seed(seed)
    own, total = [], []
    for _ in range(count):
        shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
        dtype = one or draw(st.sampled_from(_DTYPES))
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        own.append(x.to(dtype))
        total.append((x + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype))
    return own, total


@settings(max_examples=60, deadline=None)
@given(grads=_gradient_lists(), path=st.sampled_from(list(PATHS)), alpha=st.sampled_from([1.0, 1.5, 2.0, 4.0]))
def test_pair_rows_of_any_gradients_match_fp64(grads, path, alpha):
    """Every path, on generated gradient lists (shapes, counts and dtypes mixed, fp64 included), gives the fp64
    sums ``(own.other, |own|^2, |other|^2)`` with ``other = alpha * total - own``, and ``|total|^2`` when taken."""
    own, total = grads
    flatten, concat = PATHS[path]
    with mock.patch.object(microsteps, "FLATTEN", flatten), mock.patch.object(microsteps, "CONCAT", concat):
        rows, total_sq = microsteps._pair_rows(own, total, alpha, -1.0)
    x = torch.cat([g.double().flatten() for g in own])
    t = torch.cat([g.double().flatten() for g in total])
    o = alpha * t - x
    ref = [float(x @ o), float(x @ x), float(o @ o)]
    scale = [float(x.norm() * o.norm()), float(x @ x), float(o @ o)]
    for got, want, size in zip(rows, ref, scale):
        assert abs(got - want) <= 2e-5 * size + 1e-9, (path, rows, ref)
    if total_sq is not None:
        assert total_sq == pytest.approx(float(t @ t), rel=2e-5)
    taken = path == "flat_fp64" or (path == "concat" and all(g.dtype in microsteps.NARROW for g in own + total))
    assert (total_sq is not None) == taken
