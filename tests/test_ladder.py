"""The ladder and its rounding rule (see simigrad_compile/runtime/ladder.py): pure Python, no compile."""

import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simigrad_compile.config import SimigradConfig
from simigrad_compile.runtime.ladder import ACCUMULATION_SLACK, RESOLUTION, Ladder, default_rungs


def ladder(world=1, min_acc=1, **kw):
    return Ladder(SimigradConfig(**kw), world, min_acc)


def brute(lad, target):
    """Every in-bounds plan with two groups, by enumeration (independent of the search order)."""
    out = []
    for m in lad.rungs:
        for k in range(lad.min_accumulation, 2 * target + 2):
            r = lad.world_size * m * k
            if lad.lower <= r <= lad.upper and r >= 2:
                out.append((m, k, r))
    return out


def test_default_rungs():
    assert default_rungs(SimigradConfig(max_micro_batch_size=256)) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert default_rungs(SimigradConfig(max_micro_batch_size=100)) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert default_rungs(SimigradConfig(micro_batch_sizes=(24, 8, 40))) == (8, 24, 40)


def rule_by_enumeration(lad, target):
    """The module docstring's rounding rule, evaluated over the enumerated candidates."""
    target = min(max(target, lad.lower), lad.upper)
    w, top, lo = lad.world_size, lad.rungs[-1], lad.min_accumulation
    reach = math.ceil(target / (w * top))
    k0 = min(reach, lad.upper // (w * top)) if lad.upper // (w * top) >= 1 else reach
    cap = max(lo, ACCUMULATION_SLACK * reach)
    cands = brute(lad, target)
    within = [c for c in cands if max(lo, k0) <= c[1] <= cap and abs(c[2] - target) <= RESOLUTION * target]
    if within:
        k = min(c[1] for c in within)
        m = min((abs(c[2] - target), -c[0]) for c in within if c[1] == k)[1]
        return -m, k
    for pool in ([c for c in cands if c[1] <= cap], cands):
        if pool:
            _, k, m = min((abs(c[2] - target), c[1], -c[0]) for c in pool)
            return -m, k


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("min_acc", [1, 2])
@pytest.mark.parametrize("kw", [
    dict(max_micro_batch_size=64, max_batch_size=251),                     # prime upper bound
    dict(max_micro_batch_size=16, min_batch_size=37, max_batch_size=997),  # min > max_micro, primes
    dict(micro_batch_sizes=(6, 10, 24), min_batch_size=2, max_batch_size=500),
    dict(max_micro_batch_size=256, max_batch_size=8000),                   # upper bound no multiple of the top
])
def test_rounding_rule_against_enumeration(world, min_acc, kw):
    lad = ladder(world, min_acc, **kw)
    for target in list(range(lad.lower, min(lad.upper, 300) + 1)) + list(range(300, lad.upper + 1, 97)):
        plan = lad.plan(target)
        assert lad.lower <= plan.batch_size <= lad.upper and plan.micro_batch_size in lad.rungs
        assert plan.accumulation >= min_acc
        assert (plan.micro_batch_size, plan.accumulation) == rule_by_enumeration(lad, target), target


@pytest.mark.parametrize("target, expected", [
    (9, (8, 1)), (10, (8, 1)), (7, (8, 1)), (5, (4, 1)), (11, (4, 3)), (20, (16, 1)), (5000, (256, 20)),
    (8000, (256, 31)), (65536, (256, 256)),
])
def test_small_targets_stay_on_few_micro_steps_and_large_ones_on_the_top_rung(target, expected):
    lad = ladder(max_micro_batch_size=256, max_batch_size=8000 if target == 8000 else 65536)
    plan = lad.plan(target)
    assert (plan.micro_batch_size, plan.accumulation) == expected
    for t in range(2, 64):   # never a run of one-sample micro-steps beyond the cap
        p = lad.plan(t)
        assert p.accumulation <= ACCUMULATION_SLACK, (t, p)


def test_huge_targets_are_cheap():
    lad = ladder(max_micro_batch_size=8, max_batch_size=2**40)
    plan = lad.plan(10**12)
    assert plan.micro_batch_size == 8 and plan.batch_size == 10**12


def test_prime_max_batch_size_reached_closely():
    lad = ladder(max_micro_batch_size=64, max_batch_size=251)
    plan = lad.plan(251)
    assert plan.batch_size <= 251 and 251 - plan.batch_size <= RESOLUTION * 251


def test_min_above_max_micro_is_exact():
    lad = ladder(max_micro_batch_size=256, min_batch_size=1000, max_batch_size=1000)
    plan = lad.plan(1000)
    assert plan.batch_size == 1000 and plan.micro_batch_size in lad.rungs


def test_large_target_not_rounded_down():
    lad = ladder(max_micro_batch_size=256)
    assert lad.plan(65536).batch_size == 65536
    assert lad.plan(5000).batch_size == 5120


def test_one_sample_has_no_second_group():
    lad = ladder(max_micro_batch_size=8)
    assert lad.plan(1).batch_size == 2
    assert ladder(world=2, max_micro_batch_size=8).plan(1).batch_size == 2


def test_min_accumulation():
    lad = ladder(min_acc=2, max_micro_batch_size=64)
    for t in (2, 16, 64, 100, 1000):
        assert lad.plan(t).accumulation >= 2


def test_unreachable_bounds_warn(caplog):
    lad = ladder(world=2, min_batch_size=7, max_batch_size=7, max_micro_batch_size=8)
    with caplog.at_level(logging.WARNING, "simigrad_compile"):
        plan = lad.plan(7)
    assert plan.batch_size in (6, 8)
    assert "outside the bounds" in caplog.text and "target 7" in caplog.text


@pytest.mark.parametrize("world, min_acc, remaining, micro, expected", [
    (1, 1, 7, 16, 1), (1, 1, 7, 4, 2), (1, 1, 8, 4, 2), (1, 2, 3, 16, 2), (1, 1, 1, 1, 2), (2, 1, 1, 1, 1),
])
def test_tail_runs_only_the_current_rung(world, min_acc, remaining, micro, expected):
    lad = Ladder(SimigradConfig(), world, min_acc, rungs=(1, 2, 4, 8, 16))
    assert lad.tail(remaining, micro) == expected


@settings(max_examples=300, deadline=None)
@given(world=st.integers(1, 4), min_acc=st.integers(1, 3), micro=st.integers(1, 64), remaining=st.integers(1, 300),
       symbolic=st.booleans(), cuda_graphs=st.booleans())
def test_tail_sizes_cover_the_samples_exactly_where_one_graph_runs_every_size(world, min_acc, micro, remaining,
                                                                              symbolic, cuda_graphs):
    """With symbolic_batch (and no CUDA graphs) the tail is the remaining samples exactly, in parts of 2 or more
    that differ by at most one, each at most the rung; otherwise (or when parts of 2 do not fit) micro-batches of
    the current rung. Either way as many micro-batches as ``tail`` gives."""
    lad = Ladder(SimigradConfig(symbolic_batch=symbolic, cuda_graphs=cuda_graphs), world, min_acc)
    sizes = lad.tail_sizes(remaining, micro)
    assert len(sizes) == lad.tail(remaining, micro) >= min_acc
    if symbolic and not cuda_graphs and remaining >= 2 * len(sizes):
        assert sum(sizes) == remaining and min(sizes) >= 2 and max(sizes) - min(sizes) <= 1
        assert max(sizes) <= micro and list(sizes) == sorted(sizes, reverse=True)
    else:
        assert set(sizes) == {micro} and sum(sizes) >= remaining


# --- the last step of a sample budget (Ladder.cut, run.limit_next_step) ----------------------------------------
def cut_sequence(lad, remainder, plan):
    """The steps a budget's remainder takes: cut, then cut the rest from the planned step, until nothing is left."""
    out = []
    while remainder:
        p = lad.cut(remainder, plan)
        assert p is not None and 1 <= p.batch_size <= remainder, (remainder, p)
        assert p.micro_batch_size in lad.sizes()
        out.append(p)
        remainder -= p.batch_size
        plan = lad.plan(256)
    return out


@pytest.mark.parametrize("remainder", [1, 3, 7, 8, 100, 136, 200, 255, 257, 511, 1000, 4095])
@pytest.mark.parametrize("min_acc", [1, 2])
def test_cut_ends_exactly_on_any_remainder_with_the_default_ladder(remainder, min_acc):
    lad = ladder(min_acc=min_acc)  # rungs 1 .. 256
    plan = lad.plan(4096)
    steps = cut_sequence(lad, remainder, plan)
    assert sum(p.batch_size for p in steps) == remainder
    assert len(steps) <= 1 + math.ceil(math.log2(remainder + 1))
    assert all(p.accumulation <= max(ACCUMULATION_SLACK * math.ceil(remainder / 256), min_acc, plan.accumulation)
               for p in steps)


@settings(max_examples=300, deadline=None)
@given(remainder=st.integers(2, 5000), top=st.integers(3, 300), min_acc=st.integers(1, 3),
       world=st.sampled_from([1, 2, 4]))
def test_cut_ends_exactly_on_any_remainder_with_symbolic_batch(remainder, top, min_acc, world):
    """On the one-graph ladder (no rung 1 on one process) every size from 2 to the top runs, so a budget that is a
    multiple of the world size ends exactly, in at most two steps, and no step leaves a remainder of 1."""
    lad = ladder(world, min_acc, symbolic_batch=True, max_micro_batch_size=top)
    remainder *= world
    steps = cut_sequence(lad, remainder, lad.plan(4096))
    assert sum(p.batch_size for p in steps) == remainder
    assert len(steps) <= 2, steps


def test_cut_with_symbolic_batch_takes_a_size_off_the_rungs():
    lad = ladder(symbolic_batch=True, max_micro_batch_size=16)     # rungs 2, 4, 8, 16; every size 2 .. 16 runs
    current = lad.plan(64)                                         # 16 x 4
    assert lad.cut(7, current) == type(current)(7, 1)              # exact: odd, below the top
    assert lad.cut(37, current) == type(current)(7, 5)             # 35 now, then 2 x 1 (not 36, stranding 1)
    assert lad.cut(5, current) == type(current)(5, 1)
    assert ladder(symbolic_batch=False, max_micro_batch_size=16, micro_batch_sizes=(2, 4, 8, 16)).cut(
        7, current) == type(current)(2, 3)                        # the static ladder: 6, and 1 left that no rung takes


def test_cut_prefers_exact_then_statistics_then_the_current_rung():
    lad = ladder(min_acc=2, max_micro_batch_size=16)
    current = lad.plan(128)                                          # 16 x 8
    assert (current.micro_batch_size, current.accumulation) == (16, 8)
    assert lad.cut(64, current) == type(current)(16, 4)              # same rung, fewer micro-steps
    assert lad.cut(8, current) == type(current)(4, 2)                # exact, two groups (not 8 x 1)
    assert lad.cut(24, current) == type(current)(8, 3)               # exact on a smaller rung
    assert ladder(micro_batch_sizes=(4,)).cut(3, current) is None     # no rung fits


@pytest.mark.parametrize("symbolic", [False, True])
def test_limit_next_step_ends_exactly_on_budgets_off_the_rung(symbolic):
    """Default ladder (rungs up to 256: from 1 on the static ladder, from 2 with symbolic_batch), B0 = 256: budgets
    that are no multiple of the rung end exactly on the budget (the issue's 136 of 256 raised before), every
    sample trained once, in order (a prime remainder of 131 with symbolic_batch: one micro-batch of 131, no
    statistics)."""
    import torch

    import simigrad_compile as sc
    from simigrad_testkit.loop_reference import Net, dataset, train_to_budget

    for budget in (392, 256 + 255, 300, 256 + 131):
        torch.manual_seed(0)
        model = Net()
        run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.01), batch_size=256,
                                  group_mode="microsteps", symbolic_batch=symbolic)
        seen = train_to_budget(run, model, dataset(1000), budget)
        assert seen == budget, [r["batch_size"] for r in run.history]
        assert all(r["skipped"] in ("short-step", "no-statistics") for r in run.history[1:])  # none steers
        if symbolic:
            assert len(run.history) == 2  # any size from 2 to 256 runs: one cut step is exact
        run.close()


def test_a_symbolic_cut_off_the_rungs_updates_as_the_plain_loop_on_those_samples():
    """symbolic_batch, batch 16 of micro-batches of 8, budget 23: the last step is 7 samples in one micro-batch
    (no rung of 7, no rung 1), and the update is the plain fp64 loop's: the mean gradient of samples 0-15, then
    of 16-22 with LR x sqrt(7/16)."""
    import copy

    import torch

    import simigrad_compile as sc
    from simigrad_testkit.loop_reference import Net, dataset, flat, plain_sgd_steps, train_to_budget

    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net).double()
    data = dataset(40)
    run = sc.AdaptiveBatching(net, torch.optim.SGD(net.parameters(), lr=0.1), batch_size=16, min_batch_size=16,
                              max_batch_size=16, max_micro_batch_size=8, symbolic_batch=True,
                              group_mode="microsteps")
    assert train_to_budget(run, net, data, 23) == 23
    assert [(r["batch_size"], r["accumulation"], r["micro_batch_size"]) for r in run.history] == [(16, 2, 8), (7, 1, 7)]
    plain_sgd_steps(ref, *data.tensors, [(0, 16), (16, 23)], lr=0.1, b0=16)
    torch.testing.assert_close(flat(net), flat(ref), rtol=1e-5, atol=1e-6)
