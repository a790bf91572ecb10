"""The split pass (group mode ``batch``): every parameter gradient comes out as two half-batch gradients.

A parameter's gradient is ``F(c_1, ..., c_k)``: contractions ``c_j`` over the batch (``mm`` over B*T rows,
``sum`` over batch dims, ``convolution_backward``'s weight/bias, embedding's ``index_put``) followed by a map
``F`` that must be linear in them (views, adds of contributions, products with values that are not
gradient contributions, such as BatchNorm's ``rsqrt(var)``). The pass emits each contraction on the first
``floor(B/2)`` and on the last ``ceil(B/2)`` samples, replays ``F`` on each, and hands both halves to one
fused op that writes ``g = g1 + g2`` and records ``(g1.g2, |g1|^2, |g2|^2)`` (on CPU, by default, the sum and
the dot products are graph ops that Inductor fuses, and ``simigrad.record_stats`` records them; with
``split_contraction="accumulate"`` the second half's ``mm`` is an ``addmm`` into the first's instead)::

    before:  mm_4 = mm(permute_7, view)            ->  output[..., permute_8(mm_4), ...]
    after:   mm_4a = mm(slice(permute_7, 1, 0, h), slice(view, 0, 0, h))
             mm_4b = mm(slice(permute_7, 1, h, B), slice(view, 0, h, B))
             gs = simigrad.split_grads([permute_8(mm_4a), ...], [permute_8(mm_4b), ...], [4, ...])
             ->  output[..., gs[0], ...]

The rewrites, each in its own module, share one :class:`~.split_context.SplitContext` per graph:

1. :mod:`.linear_gradients` and :mod:`.leaf_operands` decide which gradients split (:meth:`SplitBackwardPass.analyse`);
2. :meth:`~.split_context.SplitContext.emit` replays each gradient on each half; :mod:`.half_operands` slices or
   masks the contractions' operands, :mod:`.convolution_halves` reruns ``convolution_backward`` for the weight
   and bias, :mod:`.sample_sums` reduces a sum over the batch and other dims once per sample for both halves;
3. :mod:`.half_checks` checks the halves (shapes, and index operands that still fit their values);
4. :mod:`.combine_halves` sums the halves and records their statistics; :mod:`.whole_from_halves` rebuilds a
   contraction that the rest of the backward still reads (BatchNorm's sums) from its halves;
   :mod:`.convolution_halves` trims the whole-batch ``convolution_backward`` to its ``grad_input``.

Every operand that the contraction lines up with the batch is cut, batch-free ones included (the position ids
``arange(T).repeat(B, 1)`` that index an embedding's gradient). The two halves replace the whole, so no matmul
FLOPs are added (contractions that cannot be sliced, such as the embedding-bag backward, multiply their gradient
by the half's 0/1 mask instead). Nothing is rewired before step 3 passes.

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
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.fx as fx

from ... import compat
from .. import ops as _ops  # noqa: F401  (registers the simigrad:: graph ops)
from . import combine_halves as combine
from .batch_dims import UNKNOWN, BatchDimPropagation
from .batch_lattice import batch_aliases, is_static
from .convolution_halves import trim_whole_batch
from .half_checks import check_halves
from .leaf_operands import NoCut, cuts_for
from .linear_gradients import LinearGradients, Refuse
from .plan import RegionPlan
from .split_context import FIRST, SECOND, SplitContext
from .whole_from_halves import rebuild_shared

log = logging.getLogger("simigrad_compile")


class SplitError(RuntimeError):
    """``group_mode="batch"`` was forced but some parameter's gradient cannot be split soundly."""


class SplitTarget(NamedTuple):
    """A parameter gradient the pass splits."""

    index: int
    """The primal's index (the statistics row's parameter)."""
    name: str
    """The parameter's name, as the region plan gives it."""
    grad: fx.Node
    """Its whole-batch gradient in the joint graph."""


@dataclass
class Analysis:
    """What :meth:`SplitBackwardPass.analyse` found on one joint graph."""

    slots: Dict[int, int]
    """Primal index -> the output slot of its gradient."""
    prop: BatchDimPropagation
    linear: LinearGradients
    targets: List[SplitTarget] = field(default_factory=list)
    refused: Dict[str, str] = field(default_factory=dict)
    """Parameter name -> why its gradient cannot be split."""


class SplitBackwardPass:
    """The split pass (see the module docstring); one instance per compiled region, run on its joint graph.

    Args:
        plan: the region's inputs and the options the pass reads (:class:`~.plan.RegionPlan`).

    Raises:
        SplitError: from ``__call__``, when ``plan.mode == "batch"`` and a parameter gradient cannot be split.
    """

    name = "split_backward"

    def __init__(self, plan: RegionPlan):
        self.plan = plan

    def __call__(self, graph: fx.Graph) -> None:
        with batch_aliases():  # the analysis's and the rewrite's sizes read the same batch symbols
            self._split(graph)

    def _split(self, graph: fx.Graph) -> None:
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
            found = self.analyse(graph, output, outs, primals, tangents)
        except Exception as error:  # a bug in a rule must not fail the user's compile
            log.warning("simigrad: the split analysis failed on this graph", exc_info=True)
            why = f"the split analysis failed ({type(error).__name__}: {error}); please report this graph"
            return self._give_up(graph, output, {name: why for _, name in params})
        if found.refused:
            return self._give_up(graph, output, found.refused)
        ctx = SplitContext(graph, output, found.prop, found.linear)
        try:
            self.rewrite(ctx, output, outs, found)
        except Exception as error:  # a rewrite that fails must not fail the user's compile
            ctx.revert()
            log.warning("simigrad: the split rewrite failed on this graph and was undone", exc_info=True)
            why = f"the split rewrite failed ({type(error).__name__}: {error}); please report this graph"
            return self._give_up(graph, output, {t.name: why for t in found.targets})

    def analyse(self, graph: fx.Graph, output: fx.Node, outs: list, primals, tangents) -> Analysis:
        """Which parameter gradients can be split, and why each other one cannot."""
        slots, tangent_outputs = _output_slots(output, outs, primals, tangents)
        prop = _propagate(graph, primals, tangents, tangent_outputs, self.plan)
        found = Analysis(slots, prop, LinearGradients(graph, prop, tangents, tangent_outputs))
        for index, name in self.plan.params:
            grad = outs[slots[index]] if index in slots else None
            if not isinstance(grad, fx.Node):
                continue
            try:
                if prop.problems:
                    raise Refuse("; ".join(prop.problems))
                if prop.batch is None or (is_static(prop.batch) and prop.batch < 2):
                    raise Refuse(f"batch of {prop.batch} cannot be halved" if prop.batch else "no batched input")
                leaves = found.linear.leaves(grad)
                if not leaves:
                    raise Refuse("its gradient does not scale with the batch (a term computed from parameters only)")
                for leaf in leaves:
                    if leaf.target is not operator.getitem:
                        cuts_for(leaf, prop.get)
                found.targets.append(SplitTarget(index, name, grad))
            except (Refuse, NoCut) as why:
                found.refused[name] = str(why)
        return found

    def rewrite(self, ctx: SplitContext, output: fx.Node, outs: list, found: Analysis) -> None:
        """Emits the halves next to the whole, checks them, and only then rewires the outputs and drops the
        whole contractions; :meth:`SplitContext.revert` undoes everything before that point."""
        targets = found.targets
        on_cpu = bool(targets) and targets[0].grad.meta["val"].device.type == "cpu"
        accumulate = self.plan.split_contraction == "accumulate"
        accumulated = combine.Accumulated(ctx)
        pairs = []
        for t in targets:
            if accumulate and combine.accumulates(ctx, t.grad):
                first = ctx.emit(t.grad, FIRST)
                pairs.append(combine.Pair(t.index, t.grad, first, total=accumulated(t.grad)))
            else:  # a gradient rounded to bf16/fp16 as its last op is paired before that rounding
                source = combine.before_rounding(ctx, t.grad)
                first = ctx.emit(source, FIRST)
                pairs.append(combine.Pair(t.index, t.grad, first, ctx.emit(source, SECOND)))
        check_halves(ctx)
        outs = list(outs)
        if self.plan.stats_sum == "graph" or (self.plan.stats_sum == "auto" and on_cpu):
            launches = combine.in_graph(ctx, output, pairs, outs, found.slots)
        else:
            launches = combine.in_kernel(ctx, pairs, outs, found.slots, self.plan.bucket_bytes)
        output.args = (outs,)
        ctx.graph.eliminate_dead_code()
        rebuilt = rebuild_shared(ctx)
        ctx.graph.lint()
        ctx.graph.eliminate_dead_code()
        trim_whole_batch(ctx)
        log.info("simigrad: split %d parameter gradients into half-batch pairs, %d accumulated by addmm (%s); "
                 "%d whole-batch contractions rebuilt from their halves", len(pairs),
                 sum(p.total is not None for p in pairs), launches, rebuilt)

    def _give_up(self, graph: fx.Graph, output: fx.Node, reasons: Dict[str, str]) -> None:
        """Raises :class:`SplitError` (mode ``batch``), or routes the smallest float gradient through
        ``simigrad::mark_unsplit`` with the reasons, so the region reports them at run time."""
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


def _output_slots(output: fx.Node, outs, primals, tangents) -> Tuple[Dict[int, int], Dict[fx.Node, fx.Node]]:
    """Which output slot holds each primal's gradient, and which forward output each tangent belongs to.

    AOTAutograd labels them (``meta["desc"]``); without labels, the joint graph's layout is
    ``[forward outputs..., one gradient per primal]`` and tangents follow the floating-point outputs.
    """
    descs = output.meta.get("desc")
    if descs is not None and len(descs) == len(outs):
        slots = compat.aot_gradient_slots(descs)
        by_desc = {d: outs[j] for j, d in enumerate(descs) if d is not None}
        labelled = {t: by_desc.get(compat.aot_tangent_output(t.meta.get("desc"))) for t in tangents}
        return slots, labelled
    log.warning("simigrad: AOTAutograd's output labels are missing; pairing gradients and tangents by position")
    first = len(outs) - len(primals)
    floats = [o for o in outs[:first] if isinstance(o, fx.Node) and _is_float(o)]
    paired = dict(zip(tangents, floats)) if len(floats) == len(tangents) else {}
    return {i: first + i for i in range(len(primals))}, paired


def _propagate(graph, primals, tangents, tangent_outputs, plan: RegionPlan) -> BatchDimPropagation:
    """Batch dims of the joint graph: a first run finds the forward outputs' dims, which the tangents take."""
    inputs = {p: (r.batch_dim if r.kind == "input" else None) for p, r in zip(primals, plan.roles)}
    names = {p: r.name for p, r in zip(primals, plan.roles)}
    first = BatchDimPropagation(graph, inputs, {t: UNKNOWN for t in tangents}, names)
    tangent_dims = {t: first.info.get(tangent_outputs.get(t), UNKNOWN) for t in tangents}
    return BatchDimPropagation(graph, inputs, tangent_dims, names)


def _is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point
