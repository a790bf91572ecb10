"""Every config value is validated, with ConfigError naming the field; environment variables parse the same way."""

import math
import time

import pytest

from simigrad_compile.compile.passes.manager import SimigradPassManager
from simigrad_compile.compile.passes.plan import RegionPlan
from simigrad_compile.config import FIELD_NAMES, PASS_NAMES, ConfigError, SimigradConfig
from simigrad_compile.envvars import config_from_env


@pytest.mark.parametrize("field", ["target_similarity", "lr_adjust_factor", "ema", "stats_bucket_mb"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_by_name(field, bad):
    with pytest.raises(ConfigError, match=repr(field)):
        SimigradConfig(**{field: bad})


@pytest.mark.parametrize("field, bad", [
    ("lr_adjust_factor", -0.5), ("stats_bucket_mb", 0.0), ("stats_bucket_mb", -1.0), ("ema", 1.0),
    ("target_similarity", 1.5), ("batch_size", 0), ("min_batch_size", -3), ("adjust_every", 0),
    ("max_micro_batch_size", 2.5), ("micro_batch_sizes", [8, 0]), ("micro_batch_sizes", "8,x"),
    ("on_non_finite", "ignore"), ("cuda_graphs", 1), ("log_dir", 3),
])
def test_out_of_range_values_are_refused_by_name(field, bad):
    with pytest.raises(ConfigError, match=repr(field)):
        SimigradConfig(**{field: bad})


def test_unknown_disabled_pass_is_refused():
    with pytest.raises(ConfigError, match="disabled_passes.*split_backward"):
        SimigradConfig(disabled_passes=["typo"])
    assert SimigradConfig(disabled_passes="split_backward").disabled_passes == ("split_backward",)


def test_pass_names_are_the_pass_managers():
    plan = RegionPlan((), "auto", 1)
    assert tuple(p.name for p in SimigradPassManager(plan).passes) == PASS_NAMES


@pytest.mark.parametrize("value", [[32, 8, 16], (8, 16, 32), "8,16,32", "8, 16, 32", "32 16 8"])
def test_micro_batch_sizes_list_or_comma_separated(value):
    assert SimigradConfig(micro_batch_sizes=value).micro_batch_sizes == (8, 16, 32)


def test_environment_variables_parse_lists_and_strings():
    cfg = config_from_env({"SIMIGRAD_MICRO_BATCH_SIZES": "8,16", "SIMIGRAD_DISABLED_PASSES": "split_backward",
                           "SIMIGRAD_ON_NON_FINITE": "raise", "SIMIGRAD_LR_ADJUST_FACTOR": "0.5"})
    assert cfg.micro_batch_sizes == (8, 16) and cfg.disabled_passes == ("split_backward",)
    assert cfg.on_non_finite == "raise" and cfg.lr_adjust_factor == 0.5
    with pytest.raises(ConfigError, match="lr_adjust_factor"):
        config_from_env({"SIMIGRAD_LR_ADJUST_FACTOR": "NaN"})


BOOLEAN_FIELDS = [f for f in FIELD_NAMES if isinstance(getattr(SimigradConfig(), f), bool)]


@pytest.mark.parametrize("field", BOOLEAN_FIELDS)
@pytest.mark.parametrize("text, value", [("1", True), ("0", False), ("true", True), ("False", False),
                                         (" yes ", True), ("OFF", False)])
def test_boolean_variables_take_one_and_zero(field, text, value):
    """``SIMIGRAD_SYMBOLIC_BATCH=1``, as the docs write it, and the words ``SIMIGRAD=1`` takes."""
    assert getattr(config_from_env({f"SIMIGRAD_{field.upper()}": text}), field) is value


@pytest.mark.parametrize("field", BOOLEAN_FIELDS)
def test_a_boolean_variable_with_another_value_is_refused_by_name(field):
    with pytest.raises(ConfigError, match=f"SIMIGRAD_{field.upper()}='2': expected 1 or 0"):
        config_from_env({f"SIMIGRAD_{field.upper()}": "2"})


def test_huge_batch_is_a_clear_error_and_a_large_one_is_cheap():
    with pytest.raises(ConfigError, match="'max_batch_size'.*2\\*\\*40"):
        SimigradConfig(max_batch_size=10**15)
    from simigrad_compile.runtime.ladder import Ladder, Plan

    start = time.perf_counter()
    lad = Ladder(SimigradConfig(max_batch_size=2**40, max_micro_batch_size=4), 1)
    assert lad.plan(2**40 - 1) == Plan(4, 2**38)
    assert time.perf_counter() - start < 1.0


def test_every_field_has_a_check():
    for name in FIELD_NAMES:
        with pytest.raises(ConfigError, match=repr(name)):
            SimigradConfig(**{name: object()})
