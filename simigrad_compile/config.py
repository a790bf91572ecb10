"""The one configuration of simigrad-compile.

Every field is reachable three ways: ``torch.compile(..., options={...})``, keyword arguments of the Python
API (``AdaptiveBatching(..., field=value)``), and the ``SIMIGRAD_<FIELD>`` environment variable
(see :mod:`simigrad_compile.envvars`, the only module that reads it; the entry points ask it for the base config
and put their own options on top). This module imports nothing of the package. Unknown keys and bad values raise :class:`ConfigError`, which names the
key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

GroupMode = Literal["auto", "batch", "microsteps", "ranks"]
Compiler = Literal["inductor", "aot_eager"]
LrScaling = Literal["sqrt", "linear", "none"]
StatsSum = Literal["auto", "kernel", "graph"]
SplitContraction = Literal["separate", "accumulate"]
OnNonFinite = Literal["skip", "raise"]
ControllerKind = Literal["simigrad", "gns", "adascale"]
BatchDim = Union[int, tuple, dict]

PASS_NAMES = ("split_backward",)
"""The graph passes ``disabled_passes`` may name (a test checks it against the pass manager's passes)."""

MAX_SAMPLES = 2**40
"""Upper limit of every batch-size field: a larger value is a typo, not a batch."""


log = logging.getLogger("simigrad_compile")


class ConfigError(ValueError):
    """A bad configuration key or value."""


@dataclass(kw_only=True, slots=True)
class SimigradConfig:
    # --- statistics (backend) ---
    group_mode: GroupMode = "auto"
    """Where the two gradient groups come from. ``batch``: the two halves of the samples, split inside the
    backward graph. ``microsteps``: the first and second half of the accumulation micro-steps. ``ranks``: the
    first and second half of the data-parallel ranks. ``auto``: ``ranks`` under data parallelism with world
    size >= 2, else ``batch`` (falling back to ``microsteps`` for a graph the split pass cannot split soundly)."""

    batch_dim: BatchDim = 0
    """The batch dimension of the compiled region's tensor inputs: one int for all, a tuple with one entry per
    tensor input (in call order; ``None`` for an input without a batch), or a dict from the input's argument
    name (for example ``"x"``) to its dim. Use ``1`` for seq-first models."""

    compiler: Compiler = "inductor"
    """The code generator behind the passes. ``aot_eager`` runs the same passes without Inductor, for
    debugging."""

    disabled_passes: tuple = ()
    """Names of graph passes to skip, for bug hunting (for example ``("split_backward",)``); one of
    :data:`PASS_NAMES`. A list or a comma-separated string."""

    stats_sum: StatsSum = "auto"
    """How the split pass combines the halves: ``kernel`` calls the fused ``simigrad::split_grads`` op (Triton
    on GPU), ``graph`` emits the sum and the three dot products as graph ops for Inductor to fuse, ``auto``
    uses ``kernel`` on GPU and ``graph`` on CPU."""

    split_contraction: SplitContraction = "separate"
    """How the split pass forms the two halves of a weight gradient's matrix product. ``separate``: each half
    contracts into its own tensor, and a fused pass writes ``g = g1 + g2`` while it sums the statistics.
    ``accumulate``: the second half's product is written into the first's, ``addmm(g1, x2^T, dy2)``; the
    statistics come from ``(g1, g)`` with ``g2 = g - g1`` per element (the rounding of ``g`` costs the cosine
    below 2e-6 while ``|g2| >= 1e-4 |g1|``, see :mod:`~simigrad_compile.compile.passes.combine_halves`), so only
    fp32/fp64 ``mm`` contractions accumulate (sums, conv weights, embeddings and low-precision products stay
    separate). The default is ``separate``: on CPU the two forms time the same (``accumulate / separate`` 1.004 on
    an idle machine, 0.987-1.002 on a loaded one; Inductor's extern ``addmm`` copies ``g1`` into its output
    first, so the sum pass becomes a copy) and ``separate`` has no cancellation; on GPU it is not measured yet
    (``bench/bench_step.py`` times both forms)."""

    stats_bucket_mb: float = 32.0
    """Largest extra gradient memory (MiB) that one fused statistics launch may hold live: the split pass
    groups parameters into launches of at most this many bytes of half-gradients."""

    # --- controller ---
    controller: ControllerKind = "simigrad"
    """Which rule sets the next step's batch and LR (:mod:`simigrad_compile.runtime.controller`; formulas in
    ``docs/statistics.md``). ``simigrad``: the paper's rule on the cosine (``target_similarity``). ``gns``: the
    target batch follows McCandlish et al.'s noise scale ``B_simple`` (EMA ``noise_ema``), at most x1.1 / x0.9 per
    step, within the bounds. ``adascale``: the batch stays at ``batch_size``; the LR is multiplied by AdaScale's
    gain ratio for the two groups (``r`` in [1, 2]; ``lr_scaling`` is not used)."""

    noise_ema: float = 0.99
    """Decay of the exponential averages of the noise and signal estimates behind ``gns`` and ``gain`` (both
    controllers and the history): ``s <- noise_ema*s + (1-noise_ema)*x``; 0 uses each step's estimate alone."""

    target_similarity: float = 0.2
    """The cosine similarity the controller steers towards: below it the batch grows, above it shrinks."""

    batch_size: Optional[int] = None
    """The initial global batch size B0 (also the reference of the LR scaling). ``None``: the loader's."""

    min_batch_size: int = 1
    """Lower bound of the global batch size."""

    max_batch_size: int = 65536
    """Upper bound of the global batch size."""

    lr_scaling: LrScaling = "sqrt"
    """How the LR follows the batch: ``sqrt`` multiplies it by ``sqrt(B/B0)``, ``linear`` by ``B/B0``."""

    lr_adjust_factor: float = 1.0
    """Damps the LR ratio r as ``(r-1)*f+1``; 1 keeps it, 0 disables LR scaling."""

    ema: float = 0.0
    """Exponential smoothing of the cosine: ``s <- ema*s + (1-ema)*cos``. 0 turns it off."""

    adjust_every: int = 1
    """Apply the controller rule every this many optimizer steps."""

    on_non_finite: OnNonFinite = "skip"
    """A step whose loss, mean gradient or statistics are not finite: ``skip`` drops the whole optimizer step
    (parameters, optimizer state and LR schedule untouched, counted, ``skipped`` in the history) and the run
    goes on; ``raise`` raises instead. An AMP overflow (``scaler=``) always skips, as ``GradScaler`` does."""

    # --- ladder ---
    max_micro_batch_size: int = 256
    """The largest micro-batch (per rank) one compiled graph runs; larger batches use accumulation."""

    micro_batch_sizes: Optional[tuple] = None
    """An explicit ladder of micro-batch sizes (a list or a comma-separated string such as ``"8,16,32"``).
    ``None``: powers of two up to ``max_micro_batch_size``."""

    symbolic_batch: bool = False
    """One compiled graph for every micro-batch of 2 samples or more: the loader marks the batch dim dynamic
    (not static), and the split pass cuts it at ``floor(B/2)`` inside the graph. ``False``: one static graph per
    rung. A model whose code specializes on the batch size gets a graph for that size, with a warning naming
    the input. See docs/compile_cache.md for the compile and step times of both."""

    cuda_graphs: bool = False
    """On GPU, capture one CUDA graph per rung (``mode="reduce-overhead"``)."""

    auto_loop: bool = True
    """Under ``SIMIGRAD=1``, give unmodified training loops adaptive batching through global optimizer hooks
    (see :mod:`simigrad_compile.integrations.auto_loop`). ``False``: only route ``torch.compile`` to this backend."""

    # --- logging ---
    log_dir: Optional[str] = None
    """Folder for the per-step CSV (and TensorBoard events when installed). ``None``: no files."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check(f.name, getattr(self, f.name)))
        _check_relations(self)

    def replace(self, **changes: Any) -> "SimigradConfig":
        return from_mapping(changes, base=self)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SimigradConfig))
_HINTS = typing.get_type_hints(SimigradConfig)


def _fail(key: str, value: Any, wanted: str) -> None:
    raise ConfigError(f"simigrad option {key!r}: bad value {value!r}; expected {wanted}")


def _check(key: str, value: Any) -> Any:
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            _fail(key, value, "one of " + ", ".join(map(repr, choices)))
        return value
    if key == "batch_dim":
        return _check_batch_dim(value)
    if key in ("disabled_passes", "micro_batch_sizes"):
        if value is None and key == "micro_batch_sizes":
            return None
        if isinstance(value, str):
            value = tuple(v for v in value.replace(",", " ").split())
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "a list")
        if key == "micro_batch_sizes":
            value = tuple(sorted({_int(key, _as_int(v), minimum=1) for v in value}))
            if not value:
                _fail(key, value, "a non-empty list of positive ints")
        else:
            unknown = [v for v in value if v not in PASS_NAMES]
            if unknown:
                _fail(key, unknown, "pass names among " + ", ".join(map(repr, PASS_NAMES)))
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(key, value, "True or False")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(key, value, "a finite number")
        return float(value)
    if hint is int or hint == Optional[int]:
        if value is None and hint == Optional[int]:
            return None
        return _int(key, value, minimum=1)
    if hint == Optional[str]:
        if value is not None and not isinstance(value, str):
            _fail(key, value, "a path or None")
        return value
    raise AssertionError(f"unhandled config type for {key}: {hint}")


def _as_int(value: Any) -> Any:
    """``"8"`` -> 8 (entries of a comma-separated string); anything else unchanged."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"an int >= {minimum}")
    if value > MAX_SAMPLES:
        _fail(key, value, f"an int <= 2**40 ({MAX_SAMPLES}); a batch this large is no batch")
    return value


def _check_batch_dim(value: Any) -> BatchDim:
    ok_dim = lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))  # noqa: E731
    if isinstance(value, bool):
        _fail("batch_dim", value, "an int, a tuple of ints, or a dict of name -> int")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and all(ok_dim(v) for v in value):
        return tuple(value)
    if isinstance(value, Mapping) and all(isinstance(k, str) and ok_dim(v) for k, v in value.items()):
        return dict(value)
    _fail("batch_dim", value, "an int, a tuple of ints, or a dict of name -> int")


def _check_relations(cfg: SimigradConfig) -> None:
    if cfg.min_batch_size > cfg.max_batch_size:
        raise ConfigError(
            f"simigrad options 'min_batch_size' ({cfg.min_batch_size}) > 'max_batch_size' ({cfg.max_batch_size})"
        )
    if not 0.0 <= cfg.ema < 1.0:
        _fail("ema", cfg.ema, "a number in [0, 1)")
    if not 0.0 <= cfg.noise_ema < 1.0:
        _fail("noise_ema", cfg.noise_ema, "a number in [0, 1)")
    if not -1.0 <= cfg.target_similarity <= 1.0:
        _fail("target_similarity", cfg.target_similarity, "a cosine in [-1, 1]")
    if cfg.lr_adjust_factor < 0:
        _fail("lr_adjust_factor", cfg.lr_adjust_factor, "a finite number >= 0")
    if not 0 < cfg.stats_bucket_mb <= 2**20:
        _fail("stats_bucket_mb", cfg.stats_bucket_mb, "a number of MiB in (0, 2**20]")
    if cfg.batch_size is not None and not cfg.min_batch_size <= cfg.batch_size <= cfg.max_batch_size:
        log.info("simigrad: batch_size %d lies outside [min_batch_size, max_batch_size] = [%d, %d]: the first step "
                 "is clamped into the bounds", cfg.batch_size, cfg.min_batch_size, cfg.max_batch_size)


def from_mapping(options: Optional[Mapping[str, Any]], base: Optional[SimigradConfig] = None) -> SimigradConfig:
    """Build a config from ``options`` on top of ``base``.

    Args:
        options: config field names to values; None or empty for none.
        base: the config the options change; None: the defaults (``SimigradConfig()``). The environment is not
            read here: an entry point that honours ``SIMIGRAD_*`` passes ``base=envvars.config_from_env()``.

    Returns:
        A new, validated :class:`SimigradConfig`.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones) or a bad value.

    Example::

        >>> from_mapping({"target_similarity": 0.3}).target_similarity
        0.3
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(
            f"unknown simigrad option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(FIELD_NAMES)}"
        )
    merged = (base if base is not None else SimigradConfig()).as_dict()
    merged.update(options)
    return SimigradConfig(**merged)


def resolve_group_mode(group_mode: str, world_size: int) -> str:
    """Where a run's statistics come from: the one rule for ``group_mode="auto"``.

    Args:
        group_mode: a :attr:`SimigradConfig.group_mode`.
        world_size: the number of data-parallel processes.

    Returns:
        ``"ranks"`` for ``auto`` under data parallelism (``world_size >= 2``), else ``group_mode`` unchanged
        (``"auto"`` on one process: the ``batch`` split, ``microsteps`` for a graph the split pass refuses).

    Example::

        >>> resolve_group_mode("auto", 4), resolve_group_mode("auto", 1), resolve_group_mode("batch", 4)
        ('ranks', 'auto', 'batch')
    """
    if group_mode == "auto" and world_size >= 2:
        return "ranks"
    return group_mode


__all__ = ["SimigradConfig", "ConfigError", "FIELD_NAMES", "PASS_NAMES", "MAX_SAMPLES", "from_mapping",
           "resolve_group_mode"]
