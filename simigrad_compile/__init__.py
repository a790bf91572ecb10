"""simigrad-compile: SimiGrad adaptive batching as a torch.compile backend.

``torch.compile(model, backend="simigrad")`` rewrites the backward graph so that every backward also yields the
split-group statistics ``(g1.g2, |g1|^2, |g2|^2)``; :class:`AdaptiveBatching` turns them into a batch size
that adapts at every optimizer step.
"""

from .config import ConfigError, SimigradConfig
from .statistics import SplitStats, gradient_stats, reset_stats

__all__ = ["ConfigError", "SimigradConfig", "SplitStats", "gradient_stats", "reset_stats"]
__version__ = "0.1.0"
from .runtime import AdaptiveBatching  # noqa: E402

__all__ += ["AdaptiveBatching"]
