"""Follow the batch dimension through a joint forward+backward ATen graph.

Every node gets an info (see :mod:`.batch_lattice`): ``None`` (batch-free), a :class:`BatchDim`, or
:data:`UNKNOWN` with a reason in ``why``. The dims come from the graph inputs (the user's tensors, ``batch_dim``
per input) and from the tangents, which carry the batch dim of the forward output they belong to. Nothing is
inferred from sizes that merely happen to equal ``B``: a batch-free operand counts only where the op itself
lines it up with a batched one (broadcasting, ``cat``, a matmul's contraction).

Order of the rules: explicit rules (:mod:`.batch_rules`), pointwise ops (``torch.Tag.pointwise``), views,
reductions, and finally the probe (:mod:`.batch_probe`), which derives what the op does from its fake kernel.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional

import sympy
import torch
import torch.fx as fx

from ... import compat
from . import batch_probe
from .batch_lattice import UNKNOWN, BatchDim, Info, Iota, Size, alias, prod, quotient, same, shape_of, size
from .batch_rules import RULES

__all__ = ["BatchDim", "BatchDimPropagation", "UNKNOWN", "Info"]

compat.load_prims()
aten, prims = torch.ops.aten, torch.ops.prims

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, prims.view_of.default}
_SUMS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.var_mean.correction,
         aten.var.correction, aten.std.correction}
_MIXING_REDUCTIONS = {aten.amax.default, aten.amin.default, aten.logsumexp.default, aten.prod.dim_int,
                      aten.prod.default, aten.any.dim, aten.any.dims, aten.any.default, aten.all.dim, aten.all.dims,
                      aten.all.default, aten.argmax.default, aten.argmin.default, aten.max.dim, aten.min.dim,
                      aten.max.default, aten.min.default}
_CREATION = {
    aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.scalar_tensor.default,
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.empty_strided.default, prims.iota.default,
    aten.randn.default, aten.rand.default, aten.randint.low, aten.lift_fresh_copy.default,
}
_SAME_VALUES = {aten.clone.default, aten._to_copy.default, prims.convert_element_type.default, aten.alias.default,
                aten.lift_fresh_copy.default}


def _pointwise(target) -> bool:
    return torch.Tag.pointwise in getattr(target, "tags", ()) or target in _SAME_VALUES


class BatchDimPropagation:
    """Computes ``info[node]`` for every node of ``graph``; ``batch`` is the (global) batch size B."""

    def __init__(self, graph: fx.Graph, input_dims: Dict[fx.Node, Optional[int]], tangent_dims: Dict[fx.Node, Info],
                 names: Optional[Dict[fx.Node, str]] = None):
        self.info: Dict[fx.Node, Info] = {}
        self.why: Dict[fx.Node, str] = {}
        self.iota: Dict[fx.Node, Iota] = {}
        self.batch: Optional[Size] = None
        self.batch_symint = None
        self.problems: List[str] = []
        self.fake_mode = next((n.meta["val"].fake_mode for n in graph.nodes
                               if hasattr(n.meta.get("val"), "fake_mode")), None)
        self.names = names or {}
        self._inputs(input_dims)
        self.info.update(tangent_dims)
        for node in graph.nodes:
            if node not in self.info:
                self.current = node
                self.info[node] = self._rule(node)
            self._track_iota(node)

    def _inputs(self, input_dims: Dict[fx.Node, Optional[int]]) -> None:
        """The user's tensors: the batch is the size most of them have along their ``batch_dim`` (an int, or a
        symbol where Dynamo made the batch dynamic; the halves are then ``floor(B/2)`` and the rest).

        An input with 1 entry along its ``batch_dim`` while others have more is batch-free: it broadcasts
        against the batch (Hugging Face's rotary ``position_embeddings`` of shape ``[1, T, D]`` reaching a graph
        after a graph break), the same values for every sample. The ops that could treat it as a sample of its
        own (``cat`` along the batch dim, a loss term of its own) refuse batch-free operands there. When every
        input has 1 entry, the batch is 1, which cannot be halved anyway."""
        found = {}
        for node, dim in input_dims.items():
            shape = shape_of(node)
            self.info[node] = None
            if dim is None or shape is None:
                continue
            dim = dim + len(shape) if dim < 0 else dim
            if not 0 <= dim < len(shape):
                self.problems.append(f"input '{self.names.get(node, node.name)}' has no dim {dim}")
                self.info[node] = UNKNOWN
            else:
                found[node] = (dim, shape[dim])
        if any(not same(n, 1) for _, n in found.values()):
            found = {node: (dim, n) for node, (dim, n) in found.items() if not same(n, 1)}  # broadcast: None
        groups: List[list] = []
        for node, (dim, n) in found.items():
            group = next((g for g in groups if same(g[0][1], n)), None)
            if group is None:
                groups.append([(node, n)])
            else:
                group.append((node, n))
        if not groups:
            return
        chosen = max(groups, key=len)
        if len(groups) > 1 and self._aliased(groups, chosen, found):
            groups = [[m for g in groups for m in g]]
            found = {node: (dim, chosen[0][1]) for node, (dim, _) in found.items()}
        self.batch = chosen[0][1]
        self.batch_symint = chosen[0][0].meta["val"].shape[found[chosen[0][0]][0]]
        for node, (dim, n) in found.items():
            self.info[node] = BatchDim(dim) if same(n, self.batch) else UNKNOWN
        if len(groups) > 1:
            listed = ", ".join(f"'{self.names.get(node, node.name)}' has {n} along dim {dim}"
                               for node, (dim, n) in found.items())
            self.problems.append(f"the inputs disagree on the batch size ({listed}): give each input its own "
                                 "batch_dim (e.g. batch_dim={'x': 0, 'h0': 1} for an RNN's initial state, None for an "
                                 "input without a batch)")

    def _aliased(self, groups: List[list], chosen: list, found: dict) -> bool:
        """With ``symbolic_batch`` each input's batch dim is a symbol of its own, and Dynamo relates two only where
        the model's code does: an attention mask read through ``mask[arange(B)]`` keeps its own symbol. Where
        every group's size is a plain symbol with the chosen batch's value at trace time, they are all read as
        the batch (:func:`~.batch_lattice.alias`; the region checks at every call that the inputs' batch sizes
        agree: :mod:`simigrad_compile.compile.input_sizes`). True when aliased."""
        def hint(group) -> Optional[int]:
            node = group[0][0]
            value = node.meta["val"].shape[found[node][0]]
            return value.node.hint if isinstance(value, torch.SymInt) else None

        batch, want = chosen[0][1], hint(chosen)
        others = [g for g in groups if g is not chosen]
        if want is None or not all(isinstance(g[0][1], sympy.Symbol) and hint(g) == want for g in others):
            return False
        return all([alias(g[0][1], batch) for g in others])

    def get(self, arg) -> Info:
        return self.info.get(arg) if isinstance(arg, fx.Node) else None

    def unknown(self, why: str) -> Info:
        self.why[self.current] = why
        return UNKNOWN

    def iota_of(self, arg, predicate: Callable[[Iota], bool]) -> Optional[Iota]:
        io = self.iota.get(arg) if isinstance(arg, fx.Node) else None
        return io if io is not None and predicate(io) else None

    def _rule(self, node: fx.Node) -> Info:
        if node.op != "call_function":
            return None
        target, args = node.target, node.args
        infos = [self.get(a) for a in node.all_input_nodes]
        if not any(i is not None for i in infos) or target in _CREATION:
            return None
        if any(i is UNKNOWN for i in infos):
            return UNKNOWN
        if target is operator.getitem:
            parent = self.get(args[0])
            return parent[args[1]] if isinstance(parent, tuple) else self.unknown("getitem of a non-tuple")
        if any(isinstance(i, tuple) for i in infos):
            return self.unknown("takes a whole tuple")
        rule = RULES.get(target)
        if rule is not None:
            return rule(self, node)
        if _pointwise(target):
            return self.broadcast(node)
        if target in _VIEWS:
            return self.view(args[0], shape_of(node))
        if target is aten.as_strided.default:
            return self._as_strided(node)
        if target is aten.as_strided_scatter.default:
            return self._as_strided_scatter(node)
        if target in _SUMS:
            return self._reduce(node)
        if target in _MIXING_REDUCTIONS:
            return self._reduce(node, mixing=True)
        info, why = batch_probe.derive(self, node)
        return self.unknown(why) if info is UNKNOWN else info

    # --- generic rules ---
    def broadcast(self, node: fx.Node, operands=None) -> Info:
        """Pointwise: batched operands agree on the batch dim once right-aligned; batch-free ones broadcast."""
        out = shape_of(node)
        if out is None:
            return self.unknown("output is not a tensor")
        found = None
        for a in operands if operands is not None else node.all_input_nodes:
            i, shape = self.get(a), shape_of(a)
            if i is None:
                continue
            if not isinstance(i, BatchDim) or shape is None:
                return self.unknown("operand is not a batched tensor")
            d = i.dim + len(out) - len(shape)
            if d < 0 or not same(shape[i.dim], out[d]):
                return self.unknown("broadcasts the batch dim")
            cand = i.at(d)
            if found is not None and found != cand:
                return self.unknown("operands disagree on the batch dim")
            found = cand
        return found

    def view(self, src, out) -> Info:
        """A reshape keeps the batch iff the B factor of the logical index lands inside one output dim."""
        i, shape = self.get(src), shape_of(src)
        if i is None:
            return None
        if not isinstance(i, BatchDim) or shape is None or out is None or self.batch is None:
            return self.unknown("view of a value without a batch dim")
        before = prod(list(shape[: i.dim]) + [i.outer])
        after = prod([i.inner] + list(shape[i.dim + 1:]))
        lead = 1
        for k, n in enumerate(out):
            outer = quotient(before, lead)
            if outer is not None:
                inner = quotient(n, prod([outer, self.batch]))
                if inner is not None and same(prod([inner] + list(out[k + 1:])), after):
                    return BatchDim(k, inner, outer)
            lead = prod([lead, n])
        return self.unknown("reshape spreads the batch over several dims")

    def _as_strided(self, node: fx.Node) -> Info:
        """A window into dense storage in which each sample owns one contiguous block (the batch dim is the
        outermost in memory, as with channels-last): an output dim that steps by whole blocks (or by the batch
        dim's stride, over all its entries), while the other dims stay inside one block, holds the samples."""
        src = node.args[0]
        i, val = self.get(src), src.meta.get("val")
        sizes, strides = [size(s) for s in node.args[1]], [size(s) for s in node.args[2]]
        offset = size(node.args[3]) if len(node.args) > 3 and node.args[3] is not None else 0
        if not (isinstance(i, BatchDim) and same(i.outer, 1)):
            return self.unknown("as_strided of a batch repeated along its dim")
        shape, src_strides, batch = list(shape_of(src)), [size(s) for s in val.stride()], self.batch
        samples = batch * i.inner if not same(i.inner, 1) else batch
        # a symbolic batch (symbolic_batch) is the one size that may be a symbol: in the batch dim, or in sizes
        if not (all(isinstance(x, int) for x in strides + src_strides + [offset, i.inner, size(val.storage_offset())])
                and all(isinstance(n, int) for d, n in enumerate(shape) if d != i.dim)
                and all(isinstance(n, int) or same(n, batch) or same(n, samples) for n in sizes + [shape[i.dim]])):
            return self.unknown("as_strided with dynamic sizes")
        step = src_strides[i.dim]
        if not (_dense_shape(shape, src_strides) and same(step * shape[i.dim], prod(shape))
                and size(val.storage_offset()) == 0):
            return self.unknown("as_strided of a tensor whose samples are not contiguous blocks")
        block = step * i.inner
        found = [(k, BatchDim(k), block) for k, (n, s) in enumerate(zip(sizes, strides)) if s == block
                 and same(n, batch)]
        found += [(k, BatchDim(k, i.inner), step) for k, (n, s) in enumerate(zip(sizes, strides))
                  if i.inner != 1 and s == step and same(n, samples)]
        if len(found) != 1:
            return self.unknown("as_strided does not keep the samples in one dim")
        k, info, span = found[0]
        if not all(isinstance(n, int) for j, n in enumerate(sizes) if j != k):
            return self.unknown("as_strided with dynamic sizes")
        reach = offset + sum((n - 1) * s for j, (n, s) in enumerate(zip(sizes, strides)) if j != k)
        return info if 0 <= offset and reach < span else self.unknown("as_strided crosses samples")

    def _as_strided_scatter(self, node: fx.Node) -> Info:
        """``as_strided_scatter`` that overwrites all of a contiguous base in row-major order is a reshape."""
        base, src = node.args[0], node.args[1]
        sizes, strides = [size(x) for x in node.args[2]], [size(x) for x in node.args[3]]
        offset = size(node.args[4]) if len(node.args) > 4 and node.args[4] is not None else 0
        shape, base_strides = list(shape_of(base)), [size(x) for x in base.meta["val"].stride()]
        if not all(same(n, 1) or same(s, r) for n, s, r in zip(shape, base_strides, _row_major(shape))):
            return self.unknown("as_strided_scatter into a strided base")
        if not (same(offset, 0) and same(prod(sizes), prod(shape))
                and all(same(s, r) for s, r in zip(strides, _row_major(sizes)))):
            return self.unknown("as_strided_scatter that keeps part of its base")
        return self.view(src, shape)

    def _reduce(self, node: fx.Node, mixing: bool = False) -> Info:
        i, shape = self.get(node.args[0]), shape_of(node.args[0])
        if not isinstance(i, BatchDim) or shape is None:
            return self.unknown("reduces a value without a batch dim")
        dims = node.args[1] if len(node.args) > 1 and not isinstance(node.args[1], bool) else node.kwargs.get("dim")
        if isinstance(dims, int):
            dims = [dims]
        if dims is None or len(dims) == 0:
            dims = range(len(shape))
        dims = {d % max(len(shape), 1) for d in dims}
        keepdim = node.kwargs.get("keepdim", next((a for a in node.args[2:] if isinstance(a, bool)), False))
        tupled = node.target in (aten.var_mean.correction, aten.max.dim, aten.min.dim)
        if i.dim in dims:
            if mixing:
                return self.unknown(f"{node.target} over the batch mixes samples")
            return (None, None) if tupled else None
        out = i.at(i.dim if keepdim else i.dim - sum(d < i.dim for d in dims))
        return (out, out) if tupled else out

    # --- integer tensors whose values are their positions ---
    def _track_iota(self, node: fx.Node) -> None:
        io = _iota(self, node)
        if io is not None:
            self.iota[node] = io


def _row_major(shape: list) -> List[Size]:
    """The strides of a contiguous tensor of ``shape`` (sizes may be symbols)."""
    return [prod(shape[k + 1:]) for k in range(len(shape))]


def _dense_shape(shape: list, strides: List[int]) -> bool:
    """Every storage element in ``[0, numel)`` belongs to exactly one entry. Sizes may be symbols (the batch),
    strides are static; compared structurally, so it adds no shape guard."""
    expected: Size = 1
    for n, s in sorted(((n, s) for n, s in zip(shape, strides) if not same(n, 1)), key=lambda x: x[1]):
        if not same(s, expected):
            return False
        expected = prod([expected, n])
    return True


def _iota(p: BatchDimPropagation, node: fx.Node) -> Optional[Iota]:
    target, args, kw = node.target, node.args, node.kwargs
    if node.op != "call_function":
        return None
    if target is prims.iota.default:
        return Iota(0, size(kw.get("start", 0)), size(kw.get("step", 1)), size(args[0]))
    if target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        start, step = (0, 1) if target is aten.arange.default else (args[0], args[2] if len(args) > 2 else 1)
        if not all(isinstance(x, (int, torch.SymInt, fx.Node)) for x in (start, step)):
            return None
        return Iota(0, size(start), size(step), shape_of(node)[0])
    src = args[0] if args and isinstance(args[0], fx.Node) else None
    io = p.iota.get(src)
    if io is None:
        return None
    shape, out = shape_of(src), shape_of(node)
    if target in _SAME_VALUES:
        return io
    if target is aten.unsqueeze.default:
        d = args[1] % len(out)
        return Iota(io.dim + (d <= io.dim), io.start, io.step, io.length)
    if target is aten.expand.default:
        return Iota(io.dim + len(out) - len(shape), io.start, io.step, io.length)
    if target is aten.slice.Tensor:  # another dim, or all of the iota's (a symbolic size keeps this no-op)
        d = (args[1] if len(args) > 1 else 0) % len(shape)
        whole = (args[2] if len(args) > 2 else 0) in (0, None) and (args[4] if len(args) > 4 else 1) == 1
        return io if d != io.dim or (whole and same(out[d], shape[d])) else None
    if target is aten.permute.default:
        return Iota([d % len(out) for d in args[1]].index(io.dim), io.start, io.step, io.length)
    if target in _VIEWS:
        kept = [k for k, n in enumerate(shape) if not same(n, 1)]
        kept_out = [k for k, n in enumerate(out) if not same(n, 1)]
        if [shape[k] for k in kept] != [out[k] for k in kept_out] or io.dim not in kept:
            return None
        return Iota(kept_out[kept.index(io.dim)], io.start, io.step, io.length)
    if target in (aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor) and isinstance(args[1], int):
        c = args[1]
        if target is aten.mul.Tensor:
            return Iota(io.dim, io.start * c, io.step * c, io.length)
        return Iota(io.dim, io.start + (c if target is aten.add.Tensor else -c), io.step, io.length)
    return None

