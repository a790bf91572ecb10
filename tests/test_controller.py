"""The paper's rule, LR scaling, EMA, interval and non-finite handling: pure Python, no compile."""

import math

import pytest

from simigrad_compile.config import ConfigError, SimigradConfig
from simigrad_compile.runtime.controller import BatchSizeController


def make(b0=100, **kw):
    base = dict(target_similarity=0.2, min_batch_size=1, max_batch_size=10_000)
    base.update(kw)
    return BatchSizeController(SimigradConfig(**base), b0)


@pytest.mark.parametrize("b, cos, expected", [
    (100, 0.0, 110), (100, 0.5, 90), (5, 0.0, 6), (5, 0.5, 4), (1, 0.0, 2), (10, 0.2, 10), (19, -1.0, 20),
    (11, 1.0, 9),
])
def test_paper_rule(b, cos, expected):
    c = make(b)
    assert c.update(cos).batch_size == expected


def test_bounds_clamp():
    c = make(100, min_batch_size=95, max_batch_size=105)
    assert c.update(-1).batch_size == 105
    assert c.update(-1).batch_size == 105
    for _ in range(3):
        c.update(1)
    assert c.batch_size == 95
    assert make(1, min_batch_size=32).batch_size == 32


@pytest.mark.parametrize("scaling, factor, b, expected", [
    ("sqrt", 1.0, 400, 2.0), ("linear", 1.0, 400, 4.0), ("none", 1.0, 400, 1.0), ("sqrt", 0.5, 400, 1.5),
    ("linear", 0.0, 400, 1.0), ("sqrt", 1.0, 25, 0.5),
])
def test_lr_scale(scaling, factor, b, expected):
    c = make(100, lr_scaling=scaling, lr_adjust_factor=factor)
    assert c.lr_scale(b) == pytest.approx(expected)


def test_ema_smooths_before_rule():
    c = make(100, ema=0.5, target_similarity=0.5)
    c.update(1.0)                    # s = 1.0 > 0.5: shrink
    assert c.batch_size == 90
    d = c.update(0.1)                # s = 0.55 > 0.5: shrink again although the raw cosine is low
    assert c.smoothed == pytest.approx(0.55) and d.batch_size == 81


def test_adjust_every():
    c = make(100, adjust_every=3)
    skipped = [c.update(0.0).skipped for _ in range(6)]
    assert skipped == ["interval", "interval", None, "interval", "interval", None]
    assert c.batch_size == 121


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_skips_and_counts(bad, caplog):
    c = make(100, ema=0.9)
    c.update(0.1)
    before = c.state_dict()
    with caplog.at_level("WARNING", logger="simigrad_compile"):
        d = c.update(bad)
    assert "non-finite cosine" in caplog.text
    assert d.skipped == "non-finite-cosine" and d.batch_size == before["batch_size"]
    after = c.state_dict()
    assert after["non_finite"] == 1 and after["smoothed"] == before["smoothed"]


def test_state_round_trip():
    c = make(100, ema=0.3)
    for cos in (0.1, 0.5, math.nan, 0.0):
        c.update(cos)
    d = make(7, ema=0.3)
    d.load_state_dict(c.state_dict())
    for cos in (0.3, 0.05):
        assert d.update(cos) == c.update(cos)


def test_config_errors_name_key():
    with pytest.raises(ConfigError, match="target_similarity"):
        SimigradConfig(target_similarity=2.0)
    with pytest.raises(ConfigError, match="min_batch_size"):
        SimigradConfig(min_batch_size=10, max_batch_size=5)
