"""simigrad-compile: SimiGrad adaptive batching as a torch.compile backend.

``torch.compile(model, backend="simigrad")`` rewrites the backward graph so that every backward also yields the
split-group statistics ``(g1.g2, |g1|^2, |g2|^2)``; :class:`AdaptiveBatching` turns them into a batch size
that adapts at every optimizer step; :func:`enable_ddp` computes the same statistics across data-parallel
ranks for the bytes of plain DDP.

Every exception a message or the docs tell a user to catch is importable from here: :class:`ConfigError`,
:class:`NonFiniteStep`, :class:`AmpMisuse`, :class:`WindowMisuse`, :class:`DirectStepError`,
:class:`ClosureStepError` and the split pass's :class:`SplitError`.
"""

from .config import ConfigError, SimigradConfig
from .runtime.adaptive import AdaptiveBatching
from .runtime.amp import AmpMisuse
from .runtime.compile_cache import CompileCacheError, load_compile_cache, save_compile_cache
from .runtime.core import StepCore
from .runtime.optim import ClosureStepError, DirectStepError
from .runtime.step_rules import NonFiniteStep
from .runtime.step_state import StepState
from .runtime.window import WindowMisuse
from .stats.gradient_stats import gradient_stats, reset_stats
from .stats.split_stats import SplitStats

__version__ = "0.1.0"
_DISTRIBUTED = ("enable_ddp", "enable_fsdp", "set_sample_counts")
_COMPILE = ("SplitError",)
__all__ = ["AdaptiveBatching", "AmpMisuse", "ClosureStepError", "CompileCacheError", "ConfigError",
           "DirectStepError", "NonFiniteStep", "SimigradConfig", "SplitStats", "StepCore", "StepState",
           "WindowMisuse", "gradient_stats", "load_compile_cache", "reset_stats", "save_compile_cache",
           *_COMPILE, *_DISTRIBUTED]


def __getattr__(name: str):
    if name in _DISTRIBUTED:  # imported on first use: most single-process users never need it
        from . import distributed

        return getattr(distributed, name)
    if name in _COMPILE:  # the backend's modules load when torch.compile first calls it
        from .compile.passes import split_backward

        return getattr(split_backward, name)
    raise AttributeError(f"module 'simigrad_compile' has no attribute {name!r}")
