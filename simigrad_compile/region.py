"""One compiled region: its parameters, its statistics sink, and the graph ops that record into it.

The rewritten backward graph calls ``simigrad::split_grads`` (and, for a graph left whole,
``simigrad::mark_unsplit``). Those ops record into "the region whose backward is running": each forward call
of a compiled region hooks its ``CompiledFunctionBackward`` node so that the region is active exactly while
that node runs. The graph holds only primal indices, so a graph loaded from a warm cache in another process
records into that process's region.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import List, Sequence

import torch
from torch.utils._pytree import tree_leaves

from .statistics import Sink

log = logging.getLogger("simigrad_compile")
_active = threading.local()


def _stack() -> list:
    if not hasattr(_active, "regions"):
        _active.regions = []
    return _active.regions


class Region:
    def __init__(self, params: Sequence[tuple], example_inputs: Sequence):
        """``params``: ``(primal index, name)`` pairs; ``example_inputs[index]`` is the parameter."""
        self.row = {index: r for r, (index, _) in enumerate(params)}
        self.sink = Sink("batch", [[(name, example_inputs[index])] for index, name in params])

    def wrap(self, compiled):
        boxed = getattr(compiled, "_boxed_call", False)

        def run(*args):
            outputs = compiled(*args)
            self.attach(outputs)
            return outputs

        run._boxed_call = boxed
        return run

    def attach(self, outputs) -> None:
        node = _compiled_backward(outputs)
        if node is None:
            return
        node.register_prehook(self._enter)
        node.register_hook(self._exit)

    def _enter(self, grad_outputs) -> None:
        _stack().append(self)

    def _exit(self, grad_inputs, grad_outputs) -> None:
        _stack().pop()

    def record(self, stats: torch.Tensor, primal_indices: Sequence[int]) -> None:
        self.sink.add(stats, [self.row[i] for i in primal_indices])


def _compiled_backward(outputs):
    for t in tree_leaves(outputs):
        if not isinstance(t, torch.Tensor) or t.grad_fn is None:
            continue
        frontier = [t.grad_fn]
        for _ in range(4):
            for fn in frontier:
                if "CompiledFunction" in type(fn).__name__:
                    return fn
            frontier = [nxt for fn in frontier for nxt, _ in fn.next_functions if nxt is not None]
    return None


def _current(op: str):
    regions = _stack()
    if not regions:
        _current.dropped += 1
        log.warning("simigrad: %s ran outside a compiled region's backward; statistics dropped (%d so far)",
                    op, _current.dropped)
        return None
    return regions[-1]


_current.dropped = 0


@torch.library.custom_op("simigrad::split_grads", mutates_args=())
def split_grads(g1: List[torch.Tensor], g2: List[torch.Tensor], primal_indices: List[int]) -> List[torch.Tensor]:
    """``g = g1 + g2`` per parameter; records ``(g1.g2, |g1|^2, |g2|^2)`` into the active region."""
    from .kernels import split_stats_sum

    grads, stats = split_stats_sum(list(g1), list(g2))
    region = _current("split_grads")
    if region is not None:
        region.record(stats, primal_indices)
    return list(grads)


@split_grads.register_fake
def _(g1, g2, primal_indices):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in g1]


@torch.library.custom_op("simigrad::record_stats", mutates_args=())
def record_stats(stats: torch.Tensor, primal_indices: List[int]) -> None:
    """Records ``stats`` rows ``(d, a, b)`` of the parameters ``primal_indices`` into the active region."""
    region = _current("record_stats")
    if region is not None:
        region.record(stats, primal_indices)


@record_stats.register_fake
def _(stats, primal_indices):
    return None


@torch.library.custom_op("simigrad::mark_unsplit", mutates_args=())
def mark_unsplit(grad: torch.Tensor, reasons: str) -> torch.Tensor:
    """Passes ``grad`` through and tells the active region which parameters were left whole, and why."""
    region = _current("mark_unsplit")
    if region is not None:
        region.sink.mark_unsplit(json.loads(reasons))
    return grad.clone()


@mark_unsplit.register_fake
def _(grad, reasons):
    return torch.empty_like(grad)


torch.fx.node.has_side_effect(torch.ops.simigrad.split_grads.default)
torch.fx.node.has_side_effect(torch.ops.simigrad.record_stats.default)
torch.fx.node.has_side_effect(torch.ops.simigrad.mark_unsplit.default)
