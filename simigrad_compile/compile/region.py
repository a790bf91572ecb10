"""One compiled region: which of its inputs are parameters, and whose statistics its backward records.

The rewritten backward graph calls the ``simigrad::`` ops of :mod:`.ops`, which hold only primal indices. Where
their rows go is decided per call, not per graph:

* **Per parameters.** Dynamo may run one compiled graph for several modules (two instances of one class share
  it), and with inlined ``nn.Module`` s the parameters are graph inputs. So each forward call looks at the
  parameters it was actually called with and picks (or makes) the :class:`~..stats.gradient_stats.Sink` of
  exactly those tensors. Sinks hold the parameters weakly, and a sink is dropped when one of its parameters
  dies, so a sweep (compile, train, delete, compile another) keeps nothing of the deleted models.
* **Per backward node.** The forward tags its own ``CompiledFunctionBackward`` node with that sink's
  :class:`Recorder`; the ops look up the node the autograd engine is running
  (``torch._C._current_autograd_node()``). There is no stack to push and pop, so a backward that raises leaves
  nothing behind, and concurrent backwards on other threads (one per device) do not see each other's regions.

Its own node is the ``CompiledFunction`` node that this call created: the autograd sequence number is read
before the call, and the search from the outputs goes back only through nodes numbered from there on. An output
that is a view of an input, or the input itself, leads back to an earlier graph's node, numbered before the call,
and is not followed; a graph whose only effect is an in-place update of an input is found through that input's
new history. Each region also keeps the ``CompiledFunction`` class of the first node it bound (AOTAutograd makes
one class per compiled graph) and binds only nodes of that class. A call with gradients on but no output (or
updated input) that needs a gradient creates no backward that runs: nothing is bound, nothing can be recorded,
and the calls are counted (:attr:`Region.unbound_calls`, and a log line per region).

Every backward through the node records: a second ``backward(retain_graph=True)`` or a
``torch.autograd.grad`` adds its ``(d, a, b)`` to the sink like a second backward adds to ``.grad``.

Known limit: a parameter whose gradient is the sum of two nodes' gradients (one graph called twice with the same
parameters in one forward, or one parameter an input of two graphs) gets the sum of each node's ``(d, a, b)``,
without the cross terms ``g1(1).g2(2) + g1(2).g2(1)`` (``tests/test_region_binding.py`` holds it as a strict
xfail).

A graph loaded from a warm cache in another process records into that process's sinks (the graph holds only
primal indices). Under compiled autograd the ops run outside any node and their rows are dropped, with a
warning.

Private torch state used here, all through :mod:`simigrad_compile.compat`: the running autograd node, whether
its graph task keeps the graph, autograd sequence numbers, a node's ``CompiledFunction`` class, and whether that
class's backward was compiled for single use (read with defaults: if it moves, the retain_graph guard turns off
and torch's own check remains).
"""

from __future__ import annotations

import functools
import logging
import operator
import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch
from ..compat import (autograd_sequence_nr, backward_single_use, compiled_function_of, current_autograd_node,
                      graph_task_keeps_graph, node_sequence_nr, tree_leaves)

from ..stats.gradient_stats import Sink
from .input_sizes import Check, check

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
    unbound_calls = 0
    """Calls, over all regions, that created no backward to bind (no output or updated input needs a gradient)."""

    def __init__(self, params: Sequence[Tuple[int, str]]):
        """``params``: ``(primal index, name)`` pairs of the graph's parameter inputs."""
        self.indices = [index for index, _ in params]
        self.names = [name for _, name in params]
        self.rows = {index: r for r, index in enumerate(self.indices)}
        many = operator.itemgetter(*self.indices) if len(self.indices) > 1 else None
        self._gather = many or (lambda inputs: tuple(inputs[i] for i in self.indices))
        self._recorders: Dict[Tuple[int, ...], Recorder] = {}
        self._last: Tuple[Optional[Tuple[int, ...]], Optional[Recorder]] = (None, None)
        self._function = None  # the CompiledFunction class of this graph, from its first bound node
        self.unbound = 0

    def wrap(self, compiled, checks: Tuple[Check, ...] = ()):
        """``compiled`` recording its statistics at every call; ``checks``: the inputs whose batch sizes must
        agree (:mod:`~simigrad_compile.compile.input_sizes`)."""
        boxed = getattr(compiled, "_boxed_call", False)

        def run(*args):
            inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args
            if checks:
                check(inputs, checks)
            recorder = self.recorder_for(inputs)
            inputs = tuple(inputs)  # a boxed call empties its list; an input updated in place leads to the node
            start = autograd_sequence_nr()
            outputs = compiled(*args)
            self.attach(outputs, inputs, start, recorder)
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

    def attach(self, outputs, inputs: Sequence, start: int, recorder: Recorder) -> None:
        """Tags the backward node that the call numbered from ``start`` created with ``recorder``."""
        if not torch.is_grad_enabled():
            return  # no autograd node was created
        node = self._own_node(tree_leaves(outputs), start) or self._own_node(inputs, start)
        if node is None:
            self.unbound += 1
            Region.unbound_calls += 1
            (log.info if self.unbound == 1 else log.debug)(
                "simigrad: a compiled graph with parameters %s ran with no output that needs a gradient: its "
                "backward never runs, so it records nothing (%d such calls of this graph)",
                ", ".join(self.names), self.unbound)
            return
        setattr(node, _TAG, recorder)
        node.register_prehook(functools.partial(_refuse_second_backward, self._function))

    def _own_node(self, tensors: Sequence, start: int):
        """The ``CompiledFunction`` node of this graph reached from ``tensors`` through nodes numbered ``start`` or
        later (made by this call on this thread); None when there is none."""
        stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node_sequence_nr(node) < start:
                continue  # made before this call: an input's history, another graph's node
            function = compiled_function_of(node)
            if function is not None and (self._function is None or function is self._function):
                self._function = function
                return node
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        return None


def _refuse_second_backward(compiled_function, grad_outputs) -> None:
    if not graph_task_keeps_graph() or not backward_single_use(compiled_function):
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

