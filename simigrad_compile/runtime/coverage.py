"""What share of a step's gradient its statistics cover, as numbers in every history record.

``covered_elements`` is the share of the step's gradient elements (over the parameters that have a gradient) whose
split statistics the step's cosine includes, ``covered_sq_norm`` the share of the squared norm of the step's
gradient they hold. A parameter is uncovered when:

* the ``batch`` statistics do not include it: outside every compiled region (only ``model.trunk`` compiled, the
  head eager), or left whole by the split pass (``SplitStats.missing`` and ``.unsplit``; a gradient summed over
  several backward nodes is ``unsplit``);
* its ``batch`` statistic was taken before a gradient hook changed its gradient (``p.register_hook`` or
  ``p.register_post_accumulate_grad_hook`` by the loop): the compiled backward splits the gradient the hook
  receives, the step applies what the hook returns (``pre_hook``).

The ``microsteps`` statistics are taken from ``p.grad`` itself, so they cover every parameter (1.0, 1.0); a step
without statistics covers nothing (0.0, 0.0).

The rule for partial coverage: the step is applied as always, and the controller is steered from the covered
part; a warning gives the coverage figures and names the uncovered parameters, at the first partial step, whenever
the uncovered set changes, and every :data:`REPEAT` partial steps. For statistics of the whole gradient, compile
the whole model (or every module that has parameters), move the hook's change into the loss, or use
``group_mode="microsteps"``.
"""

from __future__ import annotations

import logging
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import compat
from .grad_watch import counting_hooks

log = logging.getLogger("simigrad_compile")

REPEAT = 100
"""A partial coverage that does not change is warned about again every this many partial steps."""


class Coverage(NamedTuple):
    elements: float
    """Share of the step's gradient elements the statistics cover (0..1)."""
    sq_norm: float
    """Share of the squared norm of the step's gradient they cover (0..1; NaN for a non-finite gradient)."""
    uncovered: Tuple[str, ...] = ()
    """Parameters with a gradient that the statistics leave out."""
    pre_hook: Tuple[str, ...] = ()
    """Of those, the parameters whose statistic precedes a gradient hook."""


FULL = Coverage(1.0, 1.0)
NONE = Coverage(0.0, 0.0)


def hooked(params: Sequence[torch.nn.Parameter]) -> List[int]:
    """Indices of ``params`` with a gradient hook of the loop's (any but the runs' counting hooks)."""
    out, counting = [], counting_hooks()
    for i, p in enumerate(params):
        tensor_hooks, post = compat.parameter_hooks(p)
        if tensor_hooks or (post and not counting.issuperset(post)):
            out.append(i)
    return out


def coverage(params: Sequence[torch.nn.Parameter], stats, model,
             sq_norms: Optional[Sequence[float]]) -> Coverage:
    """The step's coverage; ``params`` are the window's, ``model`` names them, ``sq_norms`` are the squared norms
    of their gradients (those that have one, in order), or None to take them here."""
    mode = stats.mode
    if mode == "none":
        return NONE
    if mode == "microsteps":
        return FULL
    with_grad = [p for p in params if p.grad is not None]
    left = set(stats.missing) | set(stats.unsplit)
    pre = hooked(with_grad) if mode == "batch" else []
    if not left and not pre:
        return FULL
    if isinstance(model, torch.nn.Module) and compat.is_compile_wrapper(model):
        model = compat.compiled_original(model)  # the names the statistics use
    named = {id(p): n for n, p in model.named_parameters()} if hasattr(model, "named_parameters") else {}
    names = [named.get(id(p), f"of shape {tuple(p.shape)}") for p in with_grad]
    out = [i for i, n in enumerate(names) if n in left]
    if not out and not pre:
        return FULL
    gone = sorted(set(out) | set(pre))
    if sq_norms is None:
        norms = compat.foreach_norm([_flat(p.grad) for p in with_grad], 2.0)
        sq_norms = [v * v for v in torch.stack([t.double() for t in norms]).tolist()]
    sizes = [p.numel() for p in with_grad]
    total_n, total_sq = sum(sizes), math.fsum(sq_norms)
    miss_n, miss_sq = sum(sizes[i] for i in gone), math.fsum(sq_norms[i] for i in gone)
    return Coverage(1.0 - miss_n / total_n if total_n else 0.0,
                    (1.0 - miss_sq / total_sq) if total_sq > 0 and math.isfinite(total_sq) else math.nan,
                    tuple(names[i] for i in gone), tuple(names[i] for i in pre))


def _flat(grad: torch.Tensor) -> torch.Tensor:
    if grad.is_sparse:
        grad = grad.coalesce().values()
    return grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad


class CoverageWarning:
    """Warns by the module's rule: first partial step, a changed uncovered set, every :data:`REPEAT` steps."""

    def __init__(self):
        self.partial = 0
        self._last: Tuple[str, ...] = ()

    def observe(self, step: int, cover: Coverage) -> Optional[str]:
        """The record's note for a partial coverage (None for a full or empty one), warning by the rule."""
        if not cover.uncovered:
            return None
        self.partial += 1
        note = describe(cover)
        if cover.uncovered != self._last or self.partial % REPEAT == 1:
            self._last = cover.uncovered
            log.warning("simigrad: step %d: %s; the batch size is steered from the covered part (%d partial "
                        "step(s) so far). For statistics of the whole gradient compile the whole model, move a "
                        "gradient hook's change into the loss, or use group_mode='microsteps'.", step, note,
                        self.partial)
        return note


def describe(cover: Coverage) -> str:
    """One line: the figures and the uncovered parameters (the first few named)."""
    shown = ", ".join(repr(n) for n in cover.uncovered[:4]) + (" ..." if len(cover.uncovered) > 4 else "")
    line = (f"the statistics cover {cover.elements:.3g} of the gradient's elements and {cover.sq_norm:.3g} of its "
            f"squared norm; uncovered: {len(cover.uncovered)} parameter(s) ({shown})")
    if cover.pre_hook:
        line += (f", of which {len(cover.pre_hook)} with a gradient hook that runs after the statistics "
                 f"({', '.join(repr(n) for n in cover.pre_hook[:4])})")
    return line


__all__ = ["Coverage", "CoverageWarning", "FULL", "NONE", "REPEAT", "coverage", "describe", "hooked"]
