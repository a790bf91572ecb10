"""The Triton kernels compiled for a CUDA GPU (not interpreted): correctness against fp64, CUDA-graph capture and
replay, and no host synchronisation in the launch path. Skipped without a GPU; ``bash bench/gpu.sh`` runs it
with ``TRITON_INTERPRET=0``."""

import pytest
import torch

from simigrad_compile.kernels import ops

triton_stats = pytest.importorskip("simigrad_compile.kernels.triton_stats")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(triton_stats.INTERPRET, reason="TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 (bench/gpu.sh)"),
]

from test_kernels import (BIG, DTYPES, SIZES, assert_close, assert_split_stats_sum, assert_stats,  # noqa: E402
                          mixed_pairs, pairs, ref_stats)


def cuda_pairs(sizes, dtype, seed=0):
    xs, ys = pairs(sizes, dtype, seed)
    return [x.cuda() for x in xs], [y.cuda() for y in ys]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n", SIZES + [BIG])
def test_three_ops_on_cuda(dtype, atol, rtol, n):
    (x,), (y,) = cuda_pairs([n], dtype)
    (g,), stats = ops.split_stats_sum([x], [y])
    assert g.device.type == "cuda" and stats.device.type == "cuda"
    assert_close(g.cpu(), (x.float() + y.float()).to(dtype).cpu(), atol, rtol)
    assert_stats(stats.cpu(), ref_stats(x.cpu(), y.cpu())[None], rtol)
    want = ref_stats(x.cpu(), 2 * y.cpu().double() - x.cpu().double())[None]
    assert_stats(ops.pair_stats([x], [y], 2.0, -1.0).cpu(), want, rtol)
    for out in (None, x.clone(), "a"):
        a = x.clone()
        mean, stats = ops.shard_stats_mean(a, y, out=a if out == "a" else out)
        assert_close(mean.cpu(), ((x.float() + y.float()) / 2).to(dtype).cpu(), atol, rtol)
        assert_stats(stats.cpu(), ref_stats(x.cpu(), y.cpu())[None], rtol)


def test_many_tensors_mixed_dtypes_on_cuda():
    xs, ys = mixed_pairs("cuda")
    assert_split_stats_sum(xs, ys, *ops.split_stats_sum(xs, ys))


def test_launches_capture_and_replay_in_a_cuda_graph():
    """Capture all three ops (tables built during the eager warm-up), refill the inputs, replay: fp64 results of
    the new values."""
    xs, ys = cuda_pairs([769, 5125, BIG], torch.float32)
    shard_a, shard_b = xs[2].clone(), ys[2].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: Triton compiles, tables are built
            ops.split_stats_sum(xs, ys)
            ops.pair_stats(xs, ys, 2.0, -1.0)
            ops.shard_stats_mean(shard_a.clone(), shard_b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g, s1 = ops.split_stats_sum(xs, ys)
        s2 = ops.pair_stats(xs, ys, 2.0, -1.0)
        mean, s3 = ops.shard_stats_mean(shard_a, shard_b, out=shard_a)
    for seed in (5, 6):
        new_x, new_y = cuda_pairs([769, 5125, BIG], torch.float32, seed=seed)
        for t, v in zip(xs + ys, new_x + new_y):
            t.copy_(v)
        shard_a.copy_(new_x[2])
        shard_b.copy_(new_y[2])
        graph.replay()
        torch.cuda.synchronize()
        hx, hy = [x.cpu() for x in new_x], [y.cpu() for y in new_y]
        for o, x, y in zip(g, hx, hy):
            assert_close(o.cpu(), x + y, 1e-6, 1e-6)
        assert_stats(s1.cpu(), torch.stack([ref_stats(x, y) for x, y in zip(hx, hy)]), 1e-5)
        assert_stats(s2.cpu(), torch.stack([ref_stats(x, 2 * y.double() - x.double()) for x, y in zip(hx, hy)]), 1e-5)
        assert_close(mean.cpu(), (hx[2] + hy[2]) / 2, 1e-6, 1e-6)
        assert_stats(s3.cpu(), ref_stats(hx[2], hy[2])[None], 1e-5)


def test_a_table_built_during_capture_replays():
    """A tensor list first seen while capturing (Inductor's CUDA graph trees record with new addresses) builds
    its tables inside the capture: a pinned host buffer, copied asynchronously."""
    xs, ys = cuda_pairs([4097, 300], torch.float32, seed=2)
    ops.pair_stats(cuda_pairs([5], torch.float32)[0], cuda_pairs([5], torch.float32)[1], 1.0, 0.0)  # Triton compiled
    builds = triton_stats.TABLES.builds
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = ops.pair_stats(xs, ys, 1.0, -1.0)
    assert triton_stats.TABLES.builds == builds + 1
    graph.replay()
    torch.cuda.synchronize()
    hx, hy = [x.cpu() for x in xs], [y.cpu() for y in ys]
    assert_stats(stats.cpu(), torch.stack([ref_stats(x, y.double() - x.double()) for x, y in zip(hx, hy)]), 1e-5)


@pytest.mark.parametrize("warm", [False, True])
def test_no_host_synchronisation_in_the_launch_path(warm):
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call: none, cold or warm."""
    xs, ys = cuda_pairs([769, BIG], torch.bfloat16, seed=3 if warm else 4)
    ops.pair_stats(xs, ys, 1.0, 0.0) if warm else None
    out = torch.empty_like(xs[1])
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.split_stats_sum(xs, ys)
        ops.pair_stats(xs, ys, 1.0, 0.0)
        ops.shard_stats_mean(xs[1], ys[1], out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_custom_op_in_an_inductor_graph_with_cuda_graphs():
    """``mode="reduce-overhead"``: Inductor records the op into its CUDA graph trees; results stay right."""
    import simigrad_testkit.opaque_stats  # noqa: F401 - registers torch.ops.simigrad_test

    def fn(xs, ys):
        g, s = torch.ops.simigrad_test.split_stats_sum([x * 2 for x in xs], ys)
        return [o + 1 for o in g], s

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # the trees warm up, record, then replay
        xs, ys = cuda_pairs([769, 5125], torch.float32, seed=seed)
        g, s = compiled(xs, ys)
        for o, x, y in zip(g, xs, ys):
            assert_close(o.cpu(), (2 * x + y + 1).cpu(), 1e-5, 1e-5)
        assert_stats(s.cpu(), torch.stack([ref_stats(2 * x.cpu(), y.cpu()) for x, y in zip(xs, ys)]), 1e-5)
