"""The ladder and its rounding rule (see simigrad_compile/runtime/ladder.py): pure Python, no compile."""

import logging
import math

import pytest

from simigrad_compile.config import SimigradConfig
from simigrad_compile.runtime.ladder import RESOLUTION, Ladder, default_rungs


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


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("kw", [
    dict(max_micro_batch_size=64, max_batch_size=251),                     # prime upper bound
    dict(max_micro_batch_size=16, min_batch_size=37, max_batch_size=997),  # min > max_micro, primes
    dict(micro_batch_sizes=(6, 10, 24), min_batch_size=2, max_batch_size=500),
])
def test_rounding_rule_against_enumeration(world, kw):
    lad = ladder(world, **kw)
    for target in range(lad.lower, lad.upper + 1, 3):
        plan = lad.plan(target)
        r = plan.batch_size
        cands = brute(lad, target)
        assert cands, target
        assert lad.lower <= r <= lad.upper
        assert plan.micro_batch_size in lad.rungs
        err = abs(r - target)
        best = min(abs(c[2] - target) for c in cands)
        if err > RESOLUTION * target:
            assert err == best, (target, plan, best)          # no plan within resolution: the nearest
        else:                                                  # no plan with fewer steps from k0 on is within it
            k0 = max(1, math.ceil(target / (world * lad.rungs[-1])))
            assert not any(k0 <= c[1] < plan.accumulation and abs(c[2] - target) <= RESOLUTION * target
                           for c in cands), (target, plan)


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
