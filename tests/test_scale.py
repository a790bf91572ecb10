"""bench/bench_scale.py's alpha-beta model reproduces the textbook byte counts: a ring all-reduce sends 2S(N-1)/N per
rank, a reduce-scatter or all-gather S(N-1)/N, hierarchical or not, ring or tree; ours (reduce-scatter in the half,
swap with the partner, all-gather in the half) sends exactly a plain all-reduce's bytes, also over the network;
the original scheme's busiest rank about 2.5 times."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).parents[1] / "bench" / "bench_scale.py")
scale = sys.modules["bench_scale"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)

C = scale.Cluster()
S = 25 * 2**20
RANKS = [2, 4, 8, 16, 64, 512, 4096]


@pytest.mark.parametrize("algo", ["ring", "tree"])
@pytest.mark.parametrize("n", RANKS)
def test_collectives_send_the_textbook_bytes(algo, n):
    assert scale.collective("all_reduce", n, S, C, algo).sent == pytest.approx(2 * S * (n - 1) / n, rel=1e-12)
    for op in ("reduce_scatter", "all_gather"):
        assert scale.collective(op, n, S, C, algo).sent == pytest.approx(S * (n - 1) / n, rel=1e-12)


@pytest.mark.parametrize("algo", ["ring", "tree"])
@pytest.mark.parametrize("n", [n for n in RANKS if n >= 4])
def test_ours_sends_what_a_plain_all_reduce_sends(algo, n):
    stages = scale.ours_stages(n, S, C, algo)
    plain = scale.collective("all_reduce", n, S, C, algo)
    assert sum(s.sent for s in stages) == pytest.approx(2 * S * (n - 1) / n, rel=1e-12)
    assert sum(s.network_sent for s in stages) == pytest.approx(plain.network_sent, rel=1e-12)
    if n > C.gpus_per_node:  # across nodes: the node's shard over the network, 2(S/8)(M-1)/M for M nodes
        m = n // C.gpus_per_node
        assert plain.network_sent == pytest.approx(2 * (S / 8) * (m - 1) / m, rel=1e-12)


def test_latency_steps_of_a_ring_inside_one_node():
    cost = scale.collective("all_reduce", 8, S, C, "ring")
    assert cost.latency == pytest.approx(C.launch + 14 * C.nvlink.alpha)
    assert cost.transfer == pytest.approx(2 * S * 7 / 8 / C.nvlink.bytes_per_s)
    tree = scale.collective("all_reduce", 8, S, C, "tree")
    assert tree.latency == pytest.approx(C.launch + 2 * math.log2(8) * C.nvlink.alpha)


def test_the_original_schemes_busiest_rank_sends_about_2_5_times():
    n, total = 4096, 700e6
    busiest = (scale.collective("all_reduce", n // 2, total, C).sent + scale.swap(n, total, C).sent
               + scale.collective("all_reduce", n, total, C).sent)
    assert busiest / scale.collective("all_reduce", n, total, C).sent == pytest.approx(2.5, abs=0.01)


def test_buckets_cover_the_gradient():
    assert sum(size * count for size, count in scale.buckets(700e6, 25 * 2**20)) == pytest.approx(700e6)
    assert scale.plain_step(8, 4 * S, S, C) == pytest.approx(4 * scale.collective("all_reduce", 8, S, C).total)
