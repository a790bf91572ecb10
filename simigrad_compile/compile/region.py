"""One compiled region: which of its inputs are parameters, and whose statistics its backward records.

The rewritten backward graph calls the ``simigrad::`` ops of :mod:`.ops`, which hold only primal indices. Where
their rows go is decided per call, not per graph:

* **Per parameters.** Dynamo may run one compiled graph for several modules (two instances of one class share
  it), and with inlined ``nn.Module`` s the parameters are graph inputs. So each forward call looks at the
  parameters it was actually called with and picks (or makes) the :class:`~..stats.gradient_stats.Sink` of
  exactly those tensors. Sinks hold the parameters weakly, and a sink is dropped when one of its parameters
  dies, so a sweep (compile, train, delete, compile another) keeps nothing of the deleted models.
* **Per backward node.** The forward tags its ``CompiledFunctionBackward`` node with that sink's
  :class:`Recorder`; the ops look up the node the autograd engine is running
  (``torch._C._current_autograd_node()``). There is no stack to push and pop, so a backward that raises leaves
  nothing behind, and concurrent backwards on other threads (one per device) do not see each other's regions.

Every backward through the node records: a second ``backward(retain_graph=True)`` or a
``torch.autograd.grad`` adds its ``(d, a, b)`` to the sink like a second backward adds to ``.grad``.

A graph loaded from a warm cache in another process records into that process's sinks (the graph holds only
primal indices). Under compiled autograd the ops run outside any node and their rows are dropped, with a
warning.

Private torch state used here: the running autograd node and whether its graph task keeps the graph (both
through :mod:`simigrad_compile.compat`), and AOTAutograd's ``CompiledFunction.compiled_bw`` and
``.metadata.bw_donated_idxs`` (read with defaults: if they move, the retain_graph guard turns off and torch's own
check remains).
"""

from __future__ import annotations

import functools
import logging
import operator
import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch
from ..compat import current_autograd_node, graph_task_keeps_graph, tree_leaves

from ..stats.gradient_stats import Sink

log = logging.getLogger("simigrad_compile")
_TAG = "_simigrad_recorder"


class Recorder:
    """The statistics of one region called with one set of parameters: primal index -> row of its sink."""

    __slots__ = ("rows", "sink")

    def __init__(self, rows: Dict[int, int], sink: Sink):
        self.rows, self.sink = rows, sink

    def record(self, stats: torch.Tensor, primal_indices: Sequence[int]) -> None:
        self.sink.add(stats, [self.rows[i] for i in primal_indices])

    def mark_unsplit(self, reasons: Dict[str, str]) -> None:
        self.sink.mark_unsplit(reasons)


class Region:
    def __init__(self, params: Sequence[Tuple[int, str]]):
        """``params``: ``(primal index, name)`` pairs of the graph's parameter inputs."""
        self.indices = [index for index, _ in params]
        self.names = [name for _, name in params]
        self.rows = {index: r for r, index in enumerate(self.indices)}
        many = operator.itemgetter(*self.indices) if len(self.indices) > 1 else None
        self._gather = many or (lambda inputs: tuple(inputs[i] for i in self.indices))
        self._recorders: Dict[Tuple[int, ...], Recorder] = {}
        self._last: Tuple[Optional[Tuple[int, ...]], Optional[Recorder]] = (None, None)

    def wrap(self, compiled):
        boxed = getattr(compiled, "_boxed_call", False)

        def run(*args):
            boxed_args = len(args) == 1 and isinstance(args[0], list)
            recorder = self.recorder_for(args[0] if boxed_args else args)  # before a boxed call empties the list
            outputs = compiled(*args)
            self.attach(outputs, recorder)
            return outputs

        run._boxed_call = boxed
        return run

    def recorder_for(self, inputs: Sequence) -> Recorder:
        """The recorder of exactly these parameter tensors. A key of ids is enough: each parameter's death
        removes its key (finalizers run before an id can be reused), so a key found holds live, same tensors."""
        params = self._gather(inputs)
        key = tuple(map(id, params))
        last_key, recorder = self._last
        if key == last_key:  # the same parameters as the last call (no hashing of the key)
            return recorder
        recorder = self._recorders.get(key)
        if recorder is not None:
            self._last = (key, recorder)
            return recorder
        recorder = Recorder(self.rows, Sink("batch", [[(n, p)] for n, p in zip(self.names, params)]))
        self._recorders[key] = recorder
        self._last = (key, recorder)
        for p in params:
            weakref.finalize(p, self._forget, key, recorder)
        if len(self._recorders) > 1:
            log.info("simigrad: one compiled graph serves %d sets of parameters (instances of one class); "
                     "each keeps its own statistics", len(self._recorders))
        return recorder

    def _forget(self, key: Tuple[int, ...], recorder: Recorder) -> None:
        if self._recorders.get(key) is recorder:
            del self._recorders[key]
        if self._last[1] is recorder:
            self._last = (None, None)

    @staticmethod
    def attach(outputs, recorder: Recorder) -> None:
        node = _compiled_backward(outputs)
        if node is None:
            return
        setattr(node, _TAG, recorder)
        node.register_prehook(functools.partial(_refuse_second_backward, getattr(node, "_forward_cls", None)))


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


def _single_use(compiled_function) -> bool:
    """Whether AOTAutograd already compiled this function's backward with donated buffers: it may overwrite the
    tensors it saved, so it runs once per forward. (A backward first compiled under ``retain_graph=True`` donates
    nothing.) Private AOTAutograd state; a torch without it reads as False."""
    metadata = getattr(compiled_function, "metadata", None)
    return (getattr(compiled_function, "compiled_bw", None) is not None
            and bool(getattr(metadata, "bw_donated_idxs", None)))


def _refuse_second_backward(compiled_function, grad_outputs) -> None:
    if not graph_task_keeps_graph() or not _single_use(compiled_function):
        return
    raise RuntimeError(
        "simigrad: backward(retain_graph=True) (or create_graph, or autograd.grad with retain_graph) through a "
        "graph whose backward was already compiled for single use: AOTAutograd donated its saved tensors, so "
        "the backward may overwrite them and a second backward would read wrong values. backend='inductor' "
        "refuses this too. Fix: set torch._functorch.config.donated_buffer = False before the first "
        "torch.compile call (then torch._dynamo.reset() if something was compiled already); or make the very "
        "first backward of each graph the retain_graph=True one. Setting donated_buffer=False only after "
        "compiling does not undo the donation and gives wrong gradients, under any backend."
    )


def current(op: str):
    """The :class:`Recorder` of the compiled backward the autograd engine is running on this thread."""
    recorder = getattr(current_autograd_node(), _TAG, None)
    if recorder is None:
        current.dropped += 1
        log.warning("simigrad: %s ran outside a compiled region's backward; statistics dropped (%d so far)",
                    op, current.dropped)
    return recorder


current.dropped = 0

