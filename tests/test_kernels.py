"""Kernels: Triton launchers (under TRITON_INTERPRET=1), the CPU Inductor path and the CPU torch-op path against an
fp64 torch reference."""

import math

import pytest
import torch

from simigrad_compile.kernels import inductor_stats, pair_stats, shard_stats_mean, split_stats_sum, torch_stats

triton_stats = pytest.importorskip("simigrad_compile.kernels.triton_stats")
needs_interpreter = pytest.mark.skipif(not triton_stats.INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")

PATHS = [pytest.param(torch_stats, id="torch"), pytest.param(inductor_stats, id="inductor"),
         pytest.param(triton_stats, id="triton", marks=needs_interpreter)]
# (dtype, atol, rtol) for the stats (relative to sqrt(a*b)) and the elementwise result.
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-5, 1e-2), (torch.float16, 1e-5, 2e-3)]
SIZES = [0, 1, 7, 769, 5125, 8163]  # 8163: the smallest size on the CPU Inductor path
BIG = 2**20 + 3


def ref_stats(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double().flatten(), y.double().flatten()
    return torch.stack([x @ y, x @ x, y @ y])


def assert_stats(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Each row's error relative to its scale sqrt(a*b) (d may be near 0); reports the worst row."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = (want[:, 1] * want[:, 2]).sqrt().clamp_min(1e-30)[:, None]
    err = ((got.double() - want).abs() / scale).nan_to_num(nan=math.inf)
    if err.numel() and err.max() > rtol:
        i = int(err.max(1).values.argmax())
        raise AssertionError(f"worst row {i}: got {got[i].tolist()} want {want[i].tolist()} rel err {err[i].tolist()}")


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    err = (got.double() - want.double()).abs() - rtol * want.double().abs()
    if got.numel() and err.max() > atol:
        i = int(err.flatten().argmax())
        raise AssertionError(f"worst element {i}: got {got.flatten()[i]} want {want.flatten()[i]}")


def pairs(sizes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    ys = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    return xs, ys


def mixed_pairs(device="cpu"):
    """Pairs of mixed sizes (empty, tiny, over the kernels' thresholds), fp32 but for one bf16 and one fp16 pair."""
    xs, ys = pairs([0, 1, 7, 769, 5125, 3, 40000, 1, 130, 17000], torch.float32, seed=1)
    xs[3], ys[3] = xs[3].bfloat16(), ys[3].bfloat16()
    xs[5], ys[5] = xs[5].half(), ys[5].half()
    return [x.to(device) for x in xs], [y.to(device) for y in ys]


def assert_split_stats_sum(xs, ys, g, stats) -> None:
    """``split_stats_sum(xs, ys) == (g, stats)`` against fp64 (on the host, for inputs on any device)."""
    xs, ys = [x.cpu() for x in xs], [y.cpu() for y in ys]
    for x, y, o in zip(xs, ys, g):
        assert_close(o.cpu(), (x.float() + y.float()).to(x.dtype), 1e-5, 1e-2)
    assert_stats(stats.cpu(), torch.stack([ref_stats(x, y) for x, y in zip(xs, ys)]), 1e-2)


@pytest.mark.parametrize("mod", PATHS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_split_stats_sum(mod, dtype, atol, rtol, n):
    (x,), (y,) = pairs([n], dtype)
    (g,), stats = mod.split_stats_sum([x], [y])
    assert_close(g, (x.float() + y.float()).to(dtype), atol, rtol)
    assert_stats(stats, ref_stats(x, y)[None], rtol)


@pytest.mark.parametrize("mod", PATHS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_pair_stats(mod, dtype, atol, rtol, n):
    (own,), (total,) = pairs([n], dtype)
    stats = mod.pair_stats([own], [total], 2.0, -1.0)
    assert_stats(stats, ref_stats(own, 2 * total.double() - own.double())[None], rtol)


@pytest.mark.parametrize("mod", PATHS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("into", [None, "a", "b"])
def test_shard_stats_mean(mod, dtype, atol, rtol, n, into):
    (a,), (b,) = pairs([n], dtype)
    want_mean, want_stats = ((a.float() + b.float()) / 2).to(dtype), ref_stats(a, b)[None]
    out = {"a": a, "b": b}.get(into)
    mean, stats = mod.shard_stats_mean(a, b, out=out)
    if n:
        assert mean.data_ptr() == (out.data_ptr() if into else mean.data_ptr())
        assert into or (mean.data_ptr() != a.data_ptr() and mean.data_ptr() != b.data_ptr())
    assert_close(mean, want_mean, atol, rtol)
    assert_stats(stats, want_stats, rtol)


@pytest.mark.parametrize("mod", PATHS)
def test_big_tensor_fp32(mod):
    (x,), (y,) = pairs([BIG], torch.float32)
    (g,), stats = mod.split_stats_sum([x], [y])
    assert_close(g, x + y, 0, 0)
    assert_stats(stats, ref_stats(x, y)[None], 1e-5)
    assert_stats(mod.pair_stats([x], [y], 1.0, -1.0), ref_stats(x, y.double() - x.double())[None], 1e-5)


@pytest.mark.parametrize("mod", [torch_stats, inductor_stats], ids=["torch", "inductor"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_big_tensor_cpu_paths_low_precision(mod, dtype, atol, rtol):
    (x,), (y,) = pairs([BIG], dtype)
    (g,), stats = mod.split_stats_sum([x], [y])
    assert_close(g, (x.float() + y.float()).to(dtype), atol, rtol)
    assert_stats(stats, ref_stats(x, y)[None], rtol)
    want = ref_stats(x, 2 * y.double() - x.double())[None]
    assert_stats(mod.pair_stats([x], [y], 2.0, -1.0), want, rtol)
    mean, stats = mod.shard_stats_mean(x, y)
    assert_close(mean, ((x.float() + y.float()) / 2).to(dtype), atol, rtol)
    assert_stats(stats, ref_stats(x, y)[None], rtol)


@pytest.mark.parametrize("mod", PATHS)
def test_many_tensors_mixed_sizes_and_dtypes(mod):
    xs, ys = mixed_pairs()
    assert_split_stats_sum(xs, ys, *mod.split_stats_sum(xs, ys))
    stats = mod.pair_stats(xs, ys, 1.0, -1.0)
    assert_stats(stats, torch.stack([ref_stats(x, y.double() - x.double()) for x, y in zip(xs, ys)]), 1e-2)


@pytest.mark.parametrize("mod", PATHS)
def test_non_contiguous_inputs(mod):
    base1, base2 = torch.randn(64, 50), torch.randn(50, 64)
    xs, ys = [base1[:, ::2], base1.t()], [base2.t()[:, ::2], base2]
    g, stats = mod.split_stats_sum(xs, ys)
    for x, y, o in zip(xs, ys, g):
        assert_close(o, x + y, 1e-6, 1e-6)
    assert_stats(stats, torch.stack([ref_stats(x, y) for x, y in zip(xs, ys)]), 1e-5)
    assert_stats(mod.pair_stats(xs, ys, 2.0, -1.0), torch.stack([ref_stats(x, 2 * y - x) for x, y in zip(xs, ys)]), 1e-5)


@pytest.mark.parametrize("mod", PATHS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_propagates(mod, bad):
    xs, ys = pairs([769, 5125], torch.float32)
    xs[1][4000] = bad
    _, stats = mod.split_stats_sum(xs, ys)
    assert stats[0].isfinite().all(), "a non-finite value leaked into another tensor's row"
    assert not stats[1].isfinite().all(), f"non-finite input hidden: {stats[1].tolist()}"
    assert not mod.pair_stats(xs, ys, 2.0, -1.0)[1].isfinite().all()
    assert not mod.shard_stats_mean(xs[1], ys[1])[1].isfinite().all()


@pytest.mark.parametrize("mod", PATHS)
@pytest.mark.parametrize("case", ["near_agreement", "small_other_group"])
def test_pair_stats_avoids_the_identitys_cancellation(mod, case):
    """``b = 4|g|^2 - 4 gA.g + |gA|^2`` from fp32 dots (what a fused pass over (gA, g) gives) loses digits when
    ``|gB| << |g|`` (catastrophically: b is a small difference of large terms) and, mildly, when gA ~ gB
    (4X - 4X + X). ``other = 2g - gA`` per element, as pair_stats does, stays accurate in both cases."""
    gen = torch.Generator().manual_seed(3)
    n = 5125
    ga = torch.randn(n, generator=gen)
    if case == "near_agreement":
        gb = ga + 1e-4 * torch.randn(n, generator=gen)
    else:
        gb = 1e-3 * torch.randn(n, generator=gen)
    g = (ga + gb) / 2
    want = ref_stats(ga, 2 * g.double() - ga.double())
    got = mod.pair_stats([ga], [g], 2.0, -1.0)[0].double()
    identity_b = 4 * torch.dot(g, g) - 4 * torch.dot(ga, g) + torch.dot(ga, ga)
    ours, theirs = abs(got[2] / want[2] - 1).item(), abs(identity_b.double() / want[2] - 1).item()
    assert ours < 1e-5, f"pair_stats b rel err {ours} (identity: {theirs})"
    if case == "small_other_group":
        assert theirs > 1e-3 and theirs > 1000 * ours, f"identity rel err {theirs} vs ours {ours}"


@pytest.mark.parametrize("mod", PATHS)
@pytest.mark.parametrize("ratio", [1.0, 1e-2, 1e-3])
def test_pair_stats_of_an_accumulated_product(mod, ratio):
    """``split_contraction="accumulate"``: ``g = addmm(g1, x2^T, dy2)`` in fp32, then ``g2 = g - g1`` per element.
    Against fp64 products of the halves, the statistics stay within 1e-5 down to ``|g2| = 1e-3 |g1|``: g's
    rounding (eps |g| per element) costs ``|g2|^2`` about ``2 eps (|g1|/|g2|) / sqrt(n)`` relative (1.3e-5 at
    1e-4 here, n = 8192)."""
    gen = torch.Generator().manual_seed(4)
    x1, dy1 = torch.randn(32, 64, generator=gen), torch.randn(32, 128, generator=gen)
    x2, dy2 = torch.randn(32, 64, generator=gen) * ratio, torch.randn(32, 128, generator=gen)
    g1 = x1.T @ dy1
    g = torch.addmm(g1, x2.T, dy2)
    want = ref_stats(x1.double().T @ dy1.double(), x2.double().T @ dy2.double())
    d, a, b = mod.pair_stats([g1], [g], 1.0, -1.0)[0].double().tolist()
    scale = (want[1] * want[2]).sqrt().item()
    assert abs(d - want[0].item()) < 1e-5 * scale
    assert a == pytest.approx(want[1].item(), rel=1e-5) and b == pytest.approx(want[2].item(), rel=1e-5)
    assert d / (a * b) ** 0.5 == pytest.approx(want[0].item() / scale, abs=1e-5)


@needs_interpreter
def test_triton_tables_are_built_once_per_signature(monkeypatch):
    """The launch path reuses a tensor list's tables (a CUDA graph replays fixed addresses); new addresses build
    new ones (split_stats_sum allocates its outputs, so each call's outputs are new addresses here)."""
    monkeypatch.setattr(triton_stats, "TABLES", triton_stats._TableCache(limit=2))
    xs, ys = pairs([769, 5125], torch.float32)
    want = torch.stack([ref_stats(x, y.double() - x.double()) for x, y in zip(xs, ys)])
    for _ in range(3):
        assert_stats(triton_stats.pair_stats(xs, ys, 1.0, -1.0), want, 1e-5)
    assert triton_stats.TABLES.builds == 1
    out = torch.empty_like(xs[1])
    for _ in range(2):
        mean, stats = triton_stats.shard_stats_mean(xs[1], ys[1], out=out)
        assert_close(mean, (xs[1] + ys[1]) / 2, 1e-6, 1e-6)
    assert triton_stats.TABLES.builds == 2
    assert_stats(triton_stats.pair_stats([x.clone() for x in xs], ys, 1.0, -1.0), want, 1e-5)
    assert triton_stats.TABLES.builds == 3 and len(triton_stats.TABLES._lru) == 2  # the oldest was evicted


def test_validation_errors():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="length"):
        split_stats_sum([x], [])
    with pytest.raises(ValueError, match="shape"):
        split_stats_sum([x], [torch.randn(5)])
    with pytest.raises(ValueError, match="dtype"):
        split_stats_sum([x], [x.double()])
    with pytest.raises(ValueError, match="contiguous"):
        shard_stats_mean(x, x, out=torch.randn(8)[::2])


def test_empty_lists():
    g, stats = split_stats_sum([], [])
    assert g == [] and stats.shape == (0, 3) and stats.dtype == torch.float32
    assert pair_stats([], [], 2.0, -1.0).shape == (0, 3)
    assert triton_stats.split_stats_sum([], [])[1].shape == (0, 3)


def _graph_fn(xs, ys):
    g, s1 = torch.ops.simigrad_test.split_stats_sum([x * 2 for x in xs], ys)
    s2 = torch.ops.simigrad_test.pair_stats(xs, g, 1.0, -1.0)
    return [o + 1 for o in g], s1, s2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_called_from_a_compiled_graph(backend):
    """The eager entry points, run by an opaque op inside a compiled graph (as ``simigrad::split_grads`` runs
    ``split_stats_sum``), against fp64 references; 9001 elements take the CPU Inductor path."""
    import simigrad_testkit.opaque_stats  # noqa: F401 - registers torch.ops.simigrad_test

    xs, ys = pairs([7, 769, 9001] if backend == "inductor" else [1, 769, 5125, 9001], torch.float32, seed=5)
    torch._dynamo.reset()
    got_g, got_s1, got_s2 = torch.compile(_graph_fn, backend=backend, fullgraph=True)(xs, ys)
    for o, x, y in zip(got_g, xs, ys):
        assert_close(o, 2 * x + y + 1, 1e-6, 1e-6)
    assert_stats(got_s1, torch.stack([ref_stats(2 * x, y) for x, y in zip(xs, ys)]), 1e-5)
    want = torch.stack([ref_stats(x, (2 * x.double() + y.double()) - x.double()) for x, y in zip(xs, ys)])
    assert_stats(got_s2, want, 1e-5)


def test_cpu_dispatch_never_uses_the_interpreter(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("CPU op reached the Triton path")

    for name in ("split_stats_sum", "pair_stats", "shard_stats_mean"):
        monkeypatch.setattr(triton_stats, name, refuse)
    xs, ys = pairs([7, 769], torch.float32)
    assert_stats(split_stats_sum(xs, ys)[1], torch.stack([ref_stats(x, y) for x, y in zip(xs, ys)]), 1e-5)
    assert_stats(pair_stats(xs, ys, 1.0, 0.0), torch.stack([ref_stats(x, y) for x, y in zip(xs, ys)]), 1e-5)
    assert_stats(shard_stats_mean(xs[1], ys[1])[1], ref_stats(xs[1], ys[1])[None], 1e-5)
