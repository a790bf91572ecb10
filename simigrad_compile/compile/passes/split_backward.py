"""The split pass (group mode ``batch``): every parameter gradient comes out as two half-batch gradients.

A parameter's gradient is ``F(c_1, ..., c_k)``: contractions ``c_j`` over the batch (``mm`` over B*T rows,
``sum`` over batch dims, ``convolution_backward``'s weight/bias, embedding's ``index_put``) followed by a map
``F`` that must be linear in them (views, adds of contributions, products with values that are not
gradient contributions, such as BatchNorm's ``rsqrt(var)``). The pass emits each contraction on the first
``floor(B/2)`` and on the last ``ceil(B/2)`` samples, replays ``F`` on each, and hands both halves to one
fused op that writes ``g = g1 + g2`` and records ``(g1.g2, |g1|^2, |g2|^2)`` (on CPU, by default, the sum and
the dot products are graph ops that Inductor fuses, and ``simigrad.record_stats`` records them)::

    before:  mm_4 = mm(permute_7, view)            ->  output[..., permute_8(mm_4), ...]
    after:   mm_4a = mm(slice(permute_7, 1, 0, h), slice(view, 0, 0, h))
             mm_4b = mm(slice(permute_7, 1, h, B), slice(view, 0, h, B))
             gs = simigrad.split_grads([permute_8(mm_4a), ...], [permute_8(mm_4b), ...], [4, ...])
             ->  output[..., gs[0], ...]

The two halves replace the whole, so no matmul FLOPs are added. If any parameter cannot be split soundly,
nothing is rewritten: the pass names every such parameter with its reason, and either raises
(``group_mode="batch"``) or routes one gradient through ``simigrad.mark_unsplit`` so the region reports the
fallback at run time, also on a warm cache where this pass does not run.
"""

from __future__ import annotations

import json
import logging
import operator
from typing import Dict, Tuple

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from .. import ops as _ops  # noqa: F401  (registers the simigrad:: graph ops)
from .batch_dims import UNKNOWN, BatchDim, BatchDimPropagation
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
        if any(_symbolic(p) for p in primals + tangents):
            why = ("the graph has dynamic shapes; the split needs a static batch: torch._dynamo.mark_static(x, 0) "
                   "on the inputs, as AdaptiveBatching's loader does")
            return self._give_up(graph, output, {n: why for _, n in params})
        slots, tangent_outputs = _output_slots(output, outs, primals, tangents)
        prop = _propagate(graph, primals, tangents, tangent_outputs, self.plan)
        self.prop, self.linear = prop, LinearGradients(graph, prop, tangents)
        wanted, reasons = [], {}
        for index, name in params:
            grad = outs[slots[index]] if index in slots else None
            if not isinstance(grad, fx.Node):
                continue
            try:
                if prop.problems:
                    raise Refuse("; ".join(prop.problems))
                if prop.batch is None or prop.batch < 2:
                    raise Refuse(f"batch of {prop.batch} cannot be halved" if prop.batch else "no batched input")
                if not self.linear.leaves(grad):
                    raise Refuse("its gradient does not scale with the batch (a term computed from parameters only)")
                wanted.append((index, name, grad))
            except Refuse as why:
                reasons[name] = str(why)
        if reasons:
            return self._give_up(graph, output, reasons)
        self._rewrite(graph, output, outs, slots, wanted)

    # --- rewrite ---
    def _rewrite(self, graph, output, outs, slots, wanted) -> None:
        fake_mode = next(n.meta["val"].fake_mode for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
                         and hasattr(n.meta["val"], "fake_mode"))
        self.fake_mode, self.graph = fake_mode, graph
        self.halves: Tuple[Dict, Dict] = ({}, {})
        pairs = []
        for index, name, grad in wanted:
            pairs.append((index, grad, self._emit(grad, 0), self._emit(grad, 1)))
        on_cpu = pairs and pairs[0][1].meta["val"].device.type == "cpu"
        if self.plan.stats_sum == "graph" or (self.plan.stats_sum == "auto" and on_cpu):
            launches = self._sum_in_graph(graph, output, pairs, outs, slots)
        else:
            launches = self._sum_in_kernel(graph, pairs, outs, slots)
        output.args = (outs,)
        graph.eliminate_dead_code()
        _trim_convolution_backward(graph, self._fake)
        graph.lint()
        log.info("simigrad: split %d parameter gradients into half-batch pairs (%s)", len(pairs), launches)

    def _sum_in_kernel(self, graph, pairs, outs, slots) -> str:
        """GPU: one ``simigrad::split_grads`` launch per bucket of at most ``bucket_bytes`` of halves."""
        order = {n: i for i, n in enumerate(graph.nodes)}
        buckets, size = [[]], 0
        for pair in sorted(pairs, key=lambda p: order[p[1]]):
            nbytes = 2 * pair[1].meta["val"].numel() * pair[1].meta["val"].element_size()
            if buckets[-1] and size + nbytes > self.plan.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(pair)
            size += nbytes
        for bucket in buckets:
            last = max((n for p in bucket for n in p[2:]), key=order.get)
            with graph.inserting_after(last):
                fused = self._call(torch.ops.simigrad.split_grads.default,
                                   [p[2] for p in bucket], [p[3] for p in bucket], [p[0] for p in bucket])
            node = fused
            for j, (index, *_rest) in enumerate(bucket):
                with graph.inserting_after(node):
                    node = self._call(operator.getitem, fused, j)
                outs[slots[index]] = node
        return f"{len(buckets)} fused split_grads launch(es)"

    def _sum_in_graph(self, graph, output, pairs, outs, slots) -> str:
        """CPU: the sum and the three fp32 dot products as graph ops, so Inductor fuses them into one loop
        over each pair (one read of g1 and g2, one write of g); ``simigrad::record_stats`` takes the rows."""
        order = {n: i for i, n in enumerate(graph.nodes)}
        rows = []
        for index, _, g1, g2 in pairs:
            with graph.inserting_before(max(g1, g2, key=order.get).next):
                outs[slots[index]] = self._call(aten.add.Tensor, g1, g2)
                f1, f2 = (self._call(torch.ops.prims.convert_element_type.default, g, torch.float32)
                          if g.meta["val"].dtype != torch.float32 else g for g in (g1, g2))
                terms = [self._call(aten.sum.default, self._call(aten.mul.Tensor, x, y)) for x, y in
                         ((f1, f2), (f1, f1), (f2, f2))]
                rows.append(self._call(aten.cat.default, [self._call(aten.view.default, t, [1]) for t in terms]))
        with graph.inserting_before(output):
            stats = self._call(aten.view.default, self._call(aten.cat.default, rows), [len(rows), 3])
            self._call(torch.ops.simigrad.record_stats.default, stats, [p[0] for p in pairs])
        return "sums and dot products left to Inductor"

    def _emit(self, node, half: int):
        """The ``half`` (0: first floor(B/2) samples, 1: the rest) version of ``node``."""
        if not isinstance(node, fx.Node) or self.linear.leaves(node) is None:
            return node
        memo = self.halves[half]
        if node in memo:
            return memo[node]
        if self.linear.is_contraction(node):
            make = lambda a: self._slice(a, half, node) if isinstance(a, fx.Node) else a  # noqa: E731
        else:
            make = lambda a: self._emit(a, half)  # noqa: E731
        with node.graph.inserting_after(node):
            copy = node.graph.node_copy(node, make)
        self._fake(copy)
        memo[node] = copy
        return copy

    def _slice(self, node: fx.Node, half: int, consumer: fx.Node):
        """``node`` restricted to the samples of ``half`` along its batch dim, computed just before
        ``consumer`` (so it lands in the backward graph, not among the saved activations)."""
        info = self.prop.info.get(node)
        if node.target is aten.convolution_backward.default:
            return self._emit_conv(node, half)
        if not isinstance(info, BatchDim):
            return node
        memo = self.halves[half]
        key = ("slice", node, consumer)
        if key in memo:
            return memo[key]
        shape, d, batch = list(node.meta["val"].shape), info.dim, self.prop.batch
        if shape[d] != info.outer * batch * info.inner:
            raise AssertionError(f"{node.name}: dim {d} has {shape[d]} != {info.outer} x {batch} x {info.inner}")
        cut = (batch // 2) * info.inner
        start, end = (0, cut) if half == 0 else (cut, batch * info.inner)
        with node.graph.inserting_before(consumer):
            if info.outer == 1:
                memo[key] = self._call(aten.slice.Tensor, node, d, start, end)
            else:
                contiguous = {"memory_format": torch.contiguous_format}
                grouped = self._call(aten.clone.default, node, **contiguous)
                grouped = self._call(aten.view.default, grouped, shape[:d] + [info.outer, batch * info.inner] + shape[d + 1 :])
                part = self._call(aten.slice.Tensor, grouped, d + 1, start, end)
                part = self._call(aten.clone.default, part, **contiguous)
                memo[key] = self._call(aten.view.default, part, shape[:d] + [info.outer * (end - start)] + shape[d + 1 :])
        return memo[key]

    def _call(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        self._fake(node)
        return node

    def _emit_conv(self, conv: fx.Node, half: int):
        memo = self.halves[half]
        if conv not in memo:
            with conv.graph.inserting_after(conv):
                copy = conv.graph.node_copy(conv, lambda a: self._slice(a, half, conv) if isinstance(a, fx.Node) else a)
            mask = list(copy.args[10])
            copy.args = copy.args[:10] + ([False, mask[1], mask[2]],) + copy.args[11:]
            self._fake(copy)
            memo[conv] = copy
        return memo[conv]

    def _fake(self, node: fx.Node) -> None:
        args, kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
        with self.fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
        node.meta["partitioner_tag"] = "is_backward"

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


def _symbolic(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape)


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
    first = BatchDimPropagation(graph, inputs, {t: UNKNOWN for t in tangents})
    tangent_dims = {t: first.info.get(tangent_outputs.get(t), UNKNOWN) for t in tangents}
    return BatchDimPropagation(graph, inputs, tangent_dims)


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
