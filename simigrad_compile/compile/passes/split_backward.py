"""The split pass (group mode ``batch``): every parameter gradient comes out as two half-batch gradients.

A parameter's gradient is ``F(c_1, ..., c_k)``: contractions ``c_j`` over the batch (``mm`` over B*T rows,
``sum`` over batch dims, ``convolution_backward``'s weight/bias, embedding's ``index_put``) followed by a map
``F`` that must be linear in them (views, adds of contributions, products with values that are not
gradient contributions, such as BatchNorm's ``rsqrt(var)``). The pass emits each contraction on the first
``floor(B/2)`` and on the last ``ceil(B/2)`` samples, replays ``F`` on each, and hands both halves to one
fused op that writes ``g = g1 + g2`` and records ``(g1.g2, |g1|^2, |g2|^2)`` (on CPU, by default, the sum and
the dot products are graph ops that Inductor fuses, and ``simigrad.record_stats`` records them; with
``split_contraction="accumulate"`` the second half's ``mm`` is an ``addmm`` into the first's instead, see
:mod:`.combine_halves`)::

    before:  mm_4 = mm(permute_7, view)            ->  output[..., permute_8(mm_4), ...]
    after:   mm_4a = mm(slice(permute_7, 1, 0, h), slice(view, 0, 0, h))
             mm_4b = mm(slice(permute_7, 1, h, B), slice(view, 0, h, B))
             gs = simigrad.split_grads([permute_8(mm_4a), ...], [permute_8(mm_4b), ...], [4, ...])
             ->  output[..., gs[0], ...]

Every operand that the contraction lines up with the batch is cut, batch-free ones included (the position ids
``arange(T).repeat(B, 1)`` that index an embedding's gradient); see :mod:`.leaf_operands`. The two halves replace
the whole, so no matmul FLOPs are added (contractions that cannot be sliced, such as the embedding-bag
backward, multiply their gradient by the half's 0/1 mask instead). The halves are checked (shapes, and index
operands that still fit their values) before anything is rewired.

If any parameter cannot be split soundly, nothing is rewritten: the pass names every such parameter with its
reason, and either raises (``group_mode="batch"``) or routes one gradient through ``simigrad.mark_unsplit`` so
the region reports the fallback at run time, also on a warm cache where this pass does not run. An exception
inside the analysis or the rewrite (a bug of ours) is undone and reported the same way: it never fails the
user's compile.
"""

from __future__ import annotations

import json
import logging
import operator
from typing import Dict, Tuple

import sympy
import torch
import torch.fx as fx
from ...compat import FloorDiv, tree_map

from .. import ops as _ops  # noqa: F401  (registers the simigrad:: graph ops)
from . import combine_halves as combine
from .batch_dims import UNKNOWN, BatchDim, BatchDimPropagation
from .batch_lattice import batch_size, is_static, same, shape_of, size
from .index_layout import IndexLayout
from .leaf_operands import NoCut, cuts_for
from .linear_gradients import LinearGradients, Refuse
from .plan import RegionPlan

aten = torch.ops.aten
log = logging.getLogger("simigrad_compile")

class SplitError(RuntimeError):
    """``group_mode="batch"`` was forced but some parameter's gradient cannot be split soundly."""


class SplitBackwardPass:
    name = "split_backward"

    def __init__(self, plan: RegionPlan):
        self.plan = plan

    def __call__(self, graph: fx.Graph) -> None:
        primals = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
        tangents = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
        output = next(n for n in graph.nodes if n.op == "output")
        outs = list(output.args[0])
        params = self.plan.params
        if not params or not tangents:
            return
        if len(primals) != len(self.plan.roles):
            return self._give_up(graph, output, {n: "inputs do not line up with Dynamo's" for _, n in params})
        try:
            wanted, reasons, slots = self._analyse(graph, output, outs, primals, tangents)
        except Exception as error:  # a bug in a rule must not fail the user's compile
            log.warning("simigrad: the split analysis failed on this graph", exc_info=True)
            why = f"the split analysis failed ({type(error).__name__}: {error}); please report this graph"
            return self._give_up(graph, output, {name: why for _, name in params})
        if reasons:
            return self._give_up(graph, output, reasons)
        try:
            self._rewrite(graph, output, outs, slots, wanted)
        except Exception as error:  # a rewrite that fails must not fail the user's compile
            self._revert(graph, output)
            log.warning("simigrad: the split rewrite failed on this graph and was undone", exc_info=True)
            why = f"the split rewrite failed ({type(error).__name__}: {error}); please report this graph"
            return self._give_up(graph, output, {name: why for _, name, _ in wanted})

    def _analyse(self, graph, output, outs, primals, tangents):
        slots, tangent_outputs = _output_slots(output, outs, primals, tangents)
        prop = _propagate(graph, primals, tangents, tangent_outputs, self.plan)
        self.prop, self.linear = prop, LinearGradients(graph, prop, tangents, tangent_outputs)
        wanted, reasons = [], {}
        for index, name in self.plan.params:
            grad = outs[slots[index]] if index in slots else None
            if not isinstance(grad, fx.Node):
                continue
            try:
                if prop.problems:
                    raise Refuse("; ".join(prop.problems))
                if prop.batch is None or (is_static(prop.batch) and prop.batch < 2):
                    raise Refuse(f"batch of {prop.batch} cannot be halved" if prop.batch else "no batched input")
                if not self.linear.leaves(grad):
                    raise Refuse("its gradient does not scale with the batch (a term computed from parameters only)")
                for leaf in self.linear.leaves(grad):
                    if leaf.target is not operator.getitem:
                        cuts_for(leaf, prop.get)
                wanted.append((index, name, grad))
            except (Refuse, NoCut) as why:
                reasons[name] = str(why)
        return wanted, reasons, slots

    # --- rewrite ---
    def _rewrite(self, graph, output, outs, slots, wanted) -> None:
        """Emits the halves next to the whole, checks them, and only then rewires the outputs and drops the
        whole contractions; :meth:`_revert` undoes everything before that point."""
        self.fake_mode, self.graph = self.prop.fake_mode, graph
        self.halves: Tuple[Dict, Dict] = ({}, {})
        self.created, self.original_outputs = [], output.args
        on_cpu = bool(wanted) and wanted[0][2].meta["val"].device.type == "cpu"
        form = self.plan.split_contraction
        accumulated, accumulate = combine.Accumulated(self), form == "accumulate"
        pairs = []
        for index, name, grad in wanted:
            if accumulate and combine.accumulates(self, grad):
                pairs.append(combine.Pair(index, grad, self._emit(grad, 0), total=accumulated(grad)))
            else:
                pairs.append(combine.Pair(index, grad, self._emit(grad, 0), self._emit(grad, 1)))
        self._validate()
        outs = list(outs)
        if self.plan.stats_sum == "graph" or (self.plan.stats_sum == "auto" and on_cpu):
            launches = combine.in_graph(self, graph, output, pairs, outs, slots)
        else:
            launches = combine.in_kernel(self, graph, pairs, outs, slots, self.plan.bucket_bytes)
        output.args = (outs,)
        graph.lint()
        graph.eliminate_dead_code()
        _trim_convolution_backward(graph, self._fake)
        log.info("simigrad: split %d parameter gradients into half-batch pairs, %d accumulated by addmm (%s)",
                 len(pairs), sum(p.total is not None for p in pairs), launches)

    def _revert(self, graph: fx.Graph, output: fx.Node) -> None:
        output.args = getattr(self, "original_outputs", output.args)
        for node in reversed(getattr(self, "created", [])):
            if node.graph is graph and not node.users:
                graph.erase_node(node)

    def _validate(self) -> None:
        """Each half has the shape of its whole; each index operand still lines up with its values."""
        for memo in self.halves:
            for whole, half in memo.items():
                if not isinstance(whole, fx.Node) or not isinstance(half, fx.Node) or whole is half:
                    continue
                a, b = whole.meta.get("val"), half.meta.get("val")
                if isinstance(a, torch.Tensor) and not (
                        isinstance(b, torch.Tensor) and len(a.shape) == len(b.shape)
                        and all(same(size(x), size(y)) for x, y in zip(a.shape, b.shape))):
                    raise AssertionError(f"half of {whole.name} has shape {getattr(b, 'shape', b)}, not {a.shape}")
                _check_index_put(half)

    def _emit(self, node, half: int):
        """The ``half`` (0: first floor(B/2) samples, 1: the rest) version of ``node``."""
        if not isinstance(node, fx.Node) or self.linear.leaves(node) is None:
            return node
        memo = self.halves[half]
        if node in memo:
            return memo[node]
        if node.target is operator.getitem and node.args[0].target is aten.convolution_backward.default:
            conv = self._emit_conv(node.args[0], half)
            with node.graph.inserting_after(conv):
                copy = self._call(operator.getitem, conv, node.args[1])
        elif self.linear.is_contraction(node):
            copy = self._emit_contraction(node, half)
        else:
            with node.graph.inserting_after(node):
                copy = node.graph.node_copy(node, lambda a: self._emit(a, half))
            self.created.append(copy)
            self._fake(copy)
        memo[node] = copy
        return copy

    def _emit_contraction(self, node: fx.Node, half: int) -> fx.Node:
        """The contraction over the ``half``'s samples only: its operands cut (or its gradient masked)."""
        how, cuts = cuts_for(node, self.prop.get)
        cut = self._slice if how == "slice" else self._mask

        def each(value, path):
            if isinstance(value, (list, tuple)):
                return type(value)(each(v, path + (j,)) for j, v in enumerate(value))
            if isinstance(value, fx.Node) and path in cuts:
                return cut(value, half, node, cuts[path])
            return value

        args = tuple(each(a, (i,)) for i, a in enumerate(node.args))
        with node.graph.inserting_after(node):
            copy = self._call(node.target, *args, **node.kwargs)
        return copy

    def _cut(self, node: fx.Node, info: BatchDim, consumer: fx.Node):
        """Where the second half starts along ``info.dim`` of ``node`` within each of its ``outer`` groups:
        ``floor(B/2) * inner`` entries (an int, or graph nodes when a size is symbolic)."""
        n, batch = size(node.meta["val"].shape[info.dim]), self.prop.batch
        if not same(n, batch_size(info, batch)):
            raise AssertionError(f"{node.name}: dim {info.dim} has {n} != {info.outer} x {batch} x {info.inner}")
        if is_static(n):
            return (batch // 2) * (n // (batch * info.outer))
        return self._materialize(FloorDiv(batch, 2) * info.inner, consumer)

    def _materialize(self, expr, consumer: fx.Node):
        """An int, or graph nodes (inserted before ``consumer``) computing the symbolic size ``expr`` from the
        graph's SymInt inputs or its inputs' sizes."""
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            return self._symbol(expr, consumer)
        parts = [self._materialize(a, consumer) for a in expr.args]
        combine = {sympy.Add: operator.add, sympy.Mul: operator.mul, FloorDiv: operator.floordiv}.get(expr.func)
        if combine is None or (expr.func is FloorDiv and len(parts) != 2):
            raise AssertionError(f"cannot build the size {expr} in the graph")
        out = parts[0]
        with self.graph.inserting_before(consumer):
            for part in parts[1:]:
                out = self._call(combine, out, part)
        return out

    def _symbol(self, symbol, consumer: fx.Node):
        memo = self.halves[0]
        if ("symbol", symbol) in memo:
            return memo[("symbol", symbol)]
        for node in self.graph.nodes:
            val = node.meta.get("val")
            if node.op == "placeholder" and isinstance(val, torch.SymInt) and same(size(val), symbol):
                memo[("symbol", symbol)] = node
                return node
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for node in placeholders:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                for d, n in enumerate(val.shape):
                    if same(size(n), symbol):
                        with self.graph.inserting_after(placeholders[-1]):
                            memo[("symbol", symbol)] = self._call(aten.sym_size.int, node, d)
                        return memo[("symbol", symbol)]
        raise AssertionError(f"no input of the graph carries the size {symbol}")

    def _bounds(self, node: fx.Node, half: int, info: BatchDim, consumer: fx.Node):
        """``(start, end)`` of the half's entries along ``info.dim`` of ``node`` (when ``info.outer`` is 1)."""
        cut = self._cut(node, info, consumer)
        return (0, cut) if half == 0 else (cut, 2**63 - 1)

    def _slice(self, node: fx.Node, half: int, consumer: fx.Node, info: BatchDim):
        """``node`` restricted to the samples of ``half`` along ``info``'s dim, computed just before
        ``consumer`` (so it lands in the backward graph, not among the saved activations)."""
        memo = self.halves[half]
        key = ("slice", node, consumer, info)
        if key in memo:
            return memo[key]
        if not same(info.outer, 1):
            if not all(is_static(s) for s in shape_of(node) + (self.prop.batch,)):
                memo[key] = self._mask(node, half, consumer, info)
                return memo[key]
            memo[key] = self._slice_grouped(node, half, consumer, info)
            return memo[key]
        start, end = self._bounds(node, half, info, consumer)
        with self.graph.inserting_before(consumer):
            memo[key] = self._call(aten.slice.Tensor, node, info.dim, start, end)
        return memo[key]

    def _slice_grouped(self, node: fx.Node, half: int, consumer: fx.Node, info: BatchDim):
        """The half's entries when the batch repeats ``outer`` times along the dim (``[T, B] -> [T*B]``)."""
        shape, d, batch = list(shape_of(node)), info.dim, self.prop.batch
        if not is_static(batch) or shape[d] != info.outer * batch * info.inner:
            raise AssertionError(f"{node.name}: dim {d} has {shape[d]} != {info.outer} x {batch} x {info.inner}")
        cut = (batch // 2) * info.inner
        start, end = (0, cut) if half == 0 else (cut, batch * info.inner)
        contiguous = {"memory_format": torch.contiguous_format}
        with self.graph.inserting_before(consumer):
            grouped = self._call(aten.clone.default, node, **contiguous)
            grouped = self._call(aten.view.default, grouped,
                                 shape[:d] + [info.outer, batch * info.inner] + shape[d + 1:])
            part = self._call(aten.slice.Tensor, grouped, d + 1, start, end)
            part = self._call(aten.clone.default, part, **contiguous)
            return self._call(aten.view.default, part, shape[:d] + [info.outer * (end - start)] + shape[d + 1:])

    def _mask(self, node: fx.Node, half: int, consumer: fx.Node, info: BatchDim):
        """``node`` with the other half's entries along ``info``'s dim zeroed (same shape)."""
        memo = self.halves[half]
        key = ("mask", node, consumer, info)
        if key in memo:
            return memo[key]
        val = node.meta["val"]
        cut = self._cut(node, info, consumer)
        length = self._materialize(size(val.shape[info.dim]), consumer)
        period = self._materialize(batch_size(BatchDim(info.dim, info.inner), self.prop.batch), consumer)
        with self.graph.inserting_before(consumer):
            position = self._call(torch.ops.prims.iota.default, length, start=0, step=1, dtype=torch.int64,
                                  device=val.device, requires_grad=False)
            if not same(info.outer, 1):
                position = self._call(aten.remainder.Scalar, position, period)
            keep = self._call(aten.lt.Scalar if half == 0 else aten.ge.Scalar, position, cut)
            keep = self._call(torch.ops.prims.convert_element_type.default, keep, val.dtype)
            shape = [1] * val.dim()
            shape[info.dim] = -1
            memo[key] = self._call(aten.mul.Tensor, node, self._call(aten.view.default, keep, shape))
        return memo[key]

    def _call(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        self._fake(node)
        return node

    def _emit_conv(self, conv: fx.Node, half: int):
        memo = self.halves[half]
        if conv not in memo:
            info = next(i for i in map(self.prop.get, conv.args[:2]) if isinstance(i, BatchDim))
            args = [self._slice(a, half, conv, info) if k in (0, 1) else a for k, a in enumerate(conv.args)]
            mask = list(args[10])
            args[10] = [False, mask[1], mask[2]]
            with conv.graph.inserting_after(conv):
                memo[conv] = self._call(conv.target, *args, **conv.kwargs)
        return memo[conv]

    def _fake(self, node: fx.Node) -> None:
        args, kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
        with self.fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
        node.meta["partitioner_tag"] = "must_be_in_backward"  # never saved: a slice of an activation is cut there

    def _give_up(self, graph: fx.Graph, output: fx.Node, reasons: Dict[str, str]) -> None:
        lines = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
        if self.plan.mode == "batch":
            raise SplitError(
                f"simigrad: group_mode='batch' but {len(reasons)} parameter gradient(s) cannot be split: {lines}. "
                "Use group_mode='auto' to fall back to 'microsteps', or set batch_dim."
            )
        log.warning("simigrad: split pass left this graph whole (falls back to 'microsteps'): %s", lines)
        outs = list(output.args[0])
        first_grad = max(len(outs) - len(self.plan.roles), 0)
        slots = [i for i in range(first_grad, len(outs)) if isinstance(outs[i], fx.Node) and _is_float(outs[i])]
        if not slots:
            return
        slot = min(slots, key=lambda i: outs[i].meta["val"].numel())
        with graph.inserting_before(output):
            marked = graph.call_function(torch.ops.simigrad.mark_unsplit.default, (outs[slot], json.dumps(reasons)))
        marked.meta["val"] = outs[slot].meta["val"]
        outs[slot] = marked
        output.args = (outs,)


def _output_slots(output: fx.Node, outs, primals, tangents):
    """Which output slot holds each primal's gradient, and which forward output each tangent belongs to.

    AOTAutograd labels them (``meta["desc"]``); without labels, the joint graph's layout is
    ``[forward outputs..., one gradient per primal]`` and tangents follow the floating-point outputs.
    """
    descs = output.meta.get("desc")
    if descs is not None and len(descs) == len(outs):
        slots = {d.grad_of.idx: j for j, d in enumerate(descs) if type(d).__name__ == "GradAOTOutput"
                 and type(getattr(d, "grad_of", None)).__name__ == "PlainAOTInput"}
        by_desc = {d: outs[j] for j, d in enumerate(descs) if d is not None}
        labelled = {t: by_desc.get(getattr(t.meta.get("desc"), "output", None)) for t in tangents}
        return slots, labelled
    log.warning("simigrad: AOTAutograd's output labels are missing; pairing gradients and tangents by position")
    first = len(outs) - len(primals)
    floats = [o for o in outs[:first] if isinstance(o, fx.Node) and _is_float(o)]
    paired = dict(zip(tangents, floats)) if len(floats) == len(tangents) else {}
    return {i: first + i for i in range(len(primals))}, paired


def _propagate(graph, primals, tangents, tangent_outputs, plan: RegionPlan) -> BatchDimPropagation:
    inputs = {p: (r.batch_dim if r.kind == "input" else None) for p, r in zip(primals, plan.roles)}
    names = {p: r.name for p, r in zip(primals, plan.roles)}
    first = BatchDimPropagation(graph, inputs, {t: UNKNOWN for t in tangents}, names)
    tangent_dims = {t: first.info.get(tangent_outputs.get(t), UNKNOWN) for t in tangents}
    return BatchDimPropagation(graph, inputs, tangent_dims, names)


def _check_index_put(node: fx.Node) -> None:
    """Fake kernels let ``index_put`` values that do not broadcast to the indexed shape through (Inductor
    then fails); check it here."""
    if node.target not in (aten.index_put.default, aten._unsafe_index_put.default,
                           aten._unsafe_masked_index_put_accumulate.default):
        return
    masked = node.target is aten._unsafe_masked_index_put_accumulate.default
    base, indices = node.args[0], list(node.args[2] if masked else node.args[1])
    values = node.args[3] if masked else node.args[2]
    block = _broadcast([tuple(shape_of(t)) for t in indices if isinstance(t, fx.Node)], node)
    layout = IndexLayout(len(shape_of(base)), [() if isinstance(t, fx.Node) else None for t in indices])
    rest = [n for d, n in enumerate(shape_of(base)) if layout.of_self(d) is not None]
    indexed = rest[: layout.offset] + list(block) + rest[layout.offset:]
    for fitted in [values] + ([node.args[1]] if masked else []):
        if tuple(_broadcast([tuple(indexed), shape_of(fitted)], node)) != tuple(indexed):
            raise AssertionError(f"{node.name}: {fitted.name} {shape_of(fitted)} does not fit {tuple(indexed)}")


def _broadcast(shapes, node):
    out = []
    for k in range(max(len(s) for s in shapes)):
        sizes = [s[len(s) - 1 - k] for s in shapes if k < len(s)]
        big = [n for n in sizes if not same(n, 1)]
        if any(not same(n, big[0]) for n in big):
            raise AssertionError(f"{node.name}: shapes {shapes} do not broadcast")
        out.append(big[0] if big else 1)
    return tuple(reversed(out))


def _is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _trim_convolution_backward(graph: fx.Graph, fake) -> None:
    """The full-batch convolution_backward keeps only its grad_input once the weight/bias halves exist."""
    for node in list(graph.nodes):
        if node.target is not aten.convolution_backward.default:
            continue
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        mask = list(node.args[10])
        trimmed = [m and i in used for i, m in enumerate(mask)]
        if trimmed != mask:
            node.args = node.args[:10] + (trimmed,) + node.args[11:]
            fake(node)
