"""One compiled region: its parameters, its statistics sink, and the graph ops that record into it.

The rewritten backward graph calls the ``simigrad::`` ops of :mod:`.ops`. Those ops record into "the region whose backward is running": each forward call
of a compiled region hooks its ``CompiledFunctionBackward`` node so that the region is active exactly while
that node runs. The graph holds only primal indices, so a graph loaded from a warm cache in another process
records into that process's region.
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import torch
from torch.utils._pytree import tree_leaves

from ..stats.gradient_stats import Sink

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


def current(op: str):
    regions = _stack()
    if not regions:
        current.dropped += 1
        log.warning("simigrad: %s ran outside a compiled region's backward; statistics dropped (%d so far)",
                    op, current.dropped)
        return None
    return regions[-1]


current.dropped = 0
