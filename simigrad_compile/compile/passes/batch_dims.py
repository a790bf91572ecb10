"""Follow the batch dimension through a joint forward+backward ATen graph.

Every node gets a :class:`BatchDim` ``(dim, inner, outer)``: along ``dim`` the tensor has ``outer * B * inner``
entries (``inner = T`` after ``[B, T, D] -> [B*T, D]``, ``outer = T`` after ``[T, B, D] -> [T*B, D]``). ``None`` means the
value does not vary along the batch (parameters, constants, reductions over the batch). :data:`UNKNOWN` means
an op we have no rule for touched batched data: nothing downstream of it is split.

The dims come from the graph inputs (the user's tensors, ``batch_dim`` per input) and from the tangents,
which carry the batch dim of the forward output they belong to. Nothing is inferred from sizes that merely
happen to equal ``B``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch._prims  # noqa: F401  (defines torch.ops.prims.*)
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True)
class BatchDim:
    """Along ``dim`` the tensor has ``outer * B * inner`` entries; entry ``i`` is sample ``(i // inner) % B``."""

    dim: int
    inner: int = 1
    outer: int = 1

    def at(self, dim: int) -> "BatchDim":
        return BatchDim(dim, self.inner, self.outer)


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()
Info = Union[None, BatchDim, _Unknown, tuple]

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_REDUCTIONS = {
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
    aten.amin.default, aten.var_mean.correction, aten.var.correction, aten.logsumexp.default,
    aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.argmax.default, aten.argmin.default,
}
_CREATION = {
    aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.scalar_tensor.default,
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.empty_strided.default, torch.ops.prims.iota.default,
}
_SAME_AS_INPUT0 = {aten.native_dropout.default}


def _shape(node) -> Optional[Sequence[int]]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _pointwise(target) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags or target in (aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default)


class BatchDimPropagation:
    """Computes ``info[node]`` for every node of ``graph``; ``batch`` is the (global) batch size B."""

    def __init__(self, graph: fx.Graph, input_dims: Dict[fx.Node, Optional[int]], tangent_dims: Dict[fx.Node, Info]):
        self.info: Dict[fx.Node, Info] = {}
        self.batch: Optional[int] = None
        self.problems: List[str] = []
        for node, dim in input_dims.items():
            self.info[node] = self._input(node, dim)
        self.info.update(tangent_dims)
        for node in graph.nodes:
            if node not in self.info:
                self.info[node] = self._rule(node)

    def _input(self, node: fx.Node, dim: Optional[int]) -> Info:
        shape = _shape(node)
        if dim is None or shape is None:
            return None
        if dim < 0:
            dim += len(shape)
        if not 0 <= dim < len(shape):
            self.problems.append(f"input {node.name} has no dim {dim}")
            return UNKNOWN
        if self.batch is None:
            self.batch = shape[dim]
        elif shape[dim] != self.batch:
            self.problems.append(f"input {node.name} has batch {shape[dim]} != {self.batch}")
            return UNKNOWN
        return BatchDim(dim)

    def get(self, arg) -> Info:
        return self.info.get(arg) if isinstance(arg, fx.Node) else None

    def _rule(self, node: fx.Node) -> Info:
        if node.op != "call_function":
            return None
        target, args = node.target, node.args
        ins = [a for a in node.all_input_nodes]
        infos = [self.get(a) for a in ins]
        if not any(i is not None for i in infos):
            return None
        if any(i is UNKNOWN for i in infos):
            return UNKNOWN
        if target is operator.getitem:
            parent = self.get(args[0])
            return parent[args[1]] if isinstance(parent, tuple) else UNKNOWN
        if target in _CREATION:
            return None
        if _pointwise(target):
            return self._broadcast(node)
        if target in _VIEWS:
            return self._view(args[0], _shape(node))
        if target is aten.as_strided.default:
            return self._as_strided(node)
        if target in _REDUCTIONS:
            return self._reduce(node)
        rule = _RULES.get(target)
        if rule is None:
            return UNKNOWN
        return rule(self, node)

    # --- generic rules ---
    def _broadcast(self, node: fx.Node) -> Info:
        out = _shape(node)
        if out is None:
            return UNKNOWN
        found = None
        for a in node.all_input_nodes:
            i, shape = self.get(a), _shape(a)
            if i is None:
                continue
            if not isinstance(i, BatchDim) or shape is None:
                return UNKNOWN
            d = i.dim + len(out) - len(shape)
            if shape[i.dim] != out[d]:
                return UNKNOWN
            cand = i.at(d)
            if found is not None and found != cand:
                return UNKNOWN
            found = cand
        return found

    def _view(self, src, out: Optional[Sequence[int]]) -> Info:
        """A reshape keeps the batch iff the B factor of the logical index lands inside one output dim."""
        i, shape = self.get(src), _shape(src)
        if i is None:
            return None
        if not isinstance(i, BatchDim) or shape is None or out is None or self.batch is None:
            return UNKNOWN
        before = math.prod(shape[: i.dim]) * i.outer
        after = i.inner * math.prod(shape[i.dim + 1 :])
        lead = 1
        for k, size in enumerate(out):
            if before % lead == 0 and size % (before // lead * self.batch) == 0:
                inner = size // (before // lead * self.batch)
                if after % inner == 0 and math.prod(out[k + 1 :]) == after // inner:
                    return BatchDim(k, inner, before // lead)
            lead *= size
        return UNKNOWN

    def _as_strided(self, node: fx.Node) -> Info:
        src, size, stride = node.args[0], node.args[1], node.args[2]
        offset = node.args[3] if len(node.args) > 3 else 0
        val = src.meta.get("val")
        contiguous = list(torch.empty(size, device="meta").stride())
        if offset or list(stride) != contiguous or val is None or not val.is_contiguous() or val.numel() != math.prod(size):
            return UNKNOWN
        return self._view(src, tuple(size))

    def _reduce(self, node: fx.Node) -> Info:
        i, shape = self.get(node.args[0]), _shape(node.args[0])
        if not isinstance(i, BatchDim) or shape is None:
            return UNKNOWN
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, int):
            dims = [dims]
        if dims is None or len(dims) == 0:
            dims = range(len(shape))
        dims = {d % max(len(shape), 1) for d in dims}
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else False)
        if i.dim in dims:
            return (None, None) if node.target is aten.var_mean.correction else None
        out = i.at(i.dim if keepdim else i.dim - sum(d < i.dim for d in dims))
        return (out, out) if node.target is aten.var_mean.correction else out


def _permute(p: BatchDimPropagation, node: fx.Node) -> Info:
    i = p.get(node.args[0])
    n = len(_shape(node.args[0]))
    perm = [d % n for d in node.args[1]]
    return i.at(perm.index(i.dim))


def _transpose(p: BatchDimPropagation, node: fx.Node) -> Info:
    i = p.get(node.args[0])
    n = max(len(_shape(node.args[0])), 1)
    a, b = (node.args[1] % n, node.args[2] % n) if node.target is not aten.t.default else (0, 1)
    return i.at({a: b, b: a}.get(i.dim, i.dim))


def _unsqueeze(p: BatchDimPropagation, node: fx.Node) -> Info:
    i = p.get(node.args[0])
    d = node.args[1] % len(_shape(node))
    return i.at(i.dim + (d <= i.dim))


def _squeeze(p: BatchDimPropagation, node: fx.Node) -> Info:
    i, shape = p.get(node.args[0]), _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else range(len(shape))
    dims = [dims] if isinstance(dims, int) else dims
    gone = {d % len(shape) for d in dims if shape[d % len(shape)] == 1}
    if i.dim in gone:
        return UNKNOWN
    return i.at(i.dim - sum(d < i.dim for d in gone))


def _expand(p: BatchDimPropagation, node: fx.Node) -> Info:
    return p._broadcast(node)


def _along_other_dim(p: BatchDimPropagation, node: fx.Node) -> Info:
    """slice/select/softmax/cumsum/gather/scatter along ``dim`` (args[1]): fine unless ``dim`` is the batch."""
    shape = _shape(node.args[0])
    d = node.args[1] % len(shape)
    batched = [i for i in (p.get(a) for a in node.all_input_nodes) if i is not None]
    if any(i.dim == d for i in batched):
        if node.target is aten.slice.Tensor and _whole(node, shape[d]):
            return p.get(node.args[0])
        return UNKNOWN
    if node.target in (aten.gather.default, aten.scatter.value, aten.scatter.src):
        return p._broadcast(node)
    i = p.get(node.args[0])
    if not isinstance(i, BatchDim):
        return UNKNOWN
    return i.at(i.dim - (d < i.dim)) if node.target is aten.select.int else i


def _whole(node: fx.Node, size: int) -> bool:
    start, end, step = (list(node.args[2:5]) + [None, None, None])[:3]
    return start in (None, 0) and (end is None or end >= size) and step in (None, 1)


def _scatter_into(p: BatchDimPropagation, node: fx.Node) -> Info:
    """select_scatter(base, src, dim, index) / slice_scatter: the base must not vary along the batch."""
    base, src = p.get(node.args[0]), p.get(node.args[1])
    if base is not None or not isinstance(src, BatchDim):
        return UNKNOWN
    d = node.args[2] % len(_shape(node))
    if node.target is aten.select_scatter.default:
        return src.at(src.dim + (d <= src.dim))
    return UNKNOWN if d == src.dim else src


def _cat(p: BatchDimPropagation, node: fx.Node) -> Info:
    parts = node.args[0]
    d = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node))
    found = {p.get(t) for t in parts}
    if len(found) != 1 or None in found:
        return UNKNOWN
    (i,) = found
    if i.dim != d:
        return i
    sizes = {_shape(t)[d] for t in parts}
    return BatchDim(d, i.inner, i.outer * len(parts)) if len(sizes) == 1 else UNKNOWN


def _split(p: BatchDimPropagation, node: fx.Node) -> Info:
    i = p.get(node.args[0])
    d = (node.args[2] if len(node.args) > 2 else 0) % len(_shape(node.args[0]))
    n = len(node.meta["val"])
    return UNKNOWN if d == i.dim else tuple([i] * n)


def _unbind(p: BatchDimPropagation, node: fx.Node) -> Info:
    i = p.get(node.args[0])
    d = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node.args[0]))
    return UNKNOWN if d == i.dim else tuple([i.at(i.dim - (d < i.dim))] * len(node.meta["val"]))


def _mm(p: BatchDimPropagation, node: fx.Node) -> Info:
    """mm/addmm/bmm: batch on the kept rows/cols passes through; batch on the contracted dim of both is a
    contraction over the batch (no batch in the result)."""
    if node.target is aten.addmm.default and p.get(node.args[0]) is not None:
        return UNKNOWN
    a, b = p.get(node.args[-2]), p.get(node.args[-1])
    off = 1 if node.target is aten.bmm.default else 0
    if off and any(x is not None and x.dim == 0 for x in (a, b)):
        same = a is None or b is None or a == b
        return (a or b) if same and all(x is None or x.dim == 0 for x in (a, b)) else UNKNOWN
    if a is not None and b is not None:
        return None if (a.dim == off + 1 and b.dim == off and a.at(0) == b.at(0)) else UNKNOWN
    if a is not None:
        return a if a.dim == off else UNKNOWN
    return b if b.dim == off + 1 else UNKNOWN


def _per_sample_outputs(p: BatchDimPropagation, node: fx.Node) -> Info:
    """Ops that act on each sample separately: batch dim 0 in, batch dim 0 out (or no batch, for weights)."""
    found = {p.get(a) for a in node.all_input_nodes} - {None}
    if len(found) != 1:
        return UNKNOWN
    (i,) = found
    if i.dim != 0:
        return UNKNOWN
    val = node.meta.get("val")
    size = _shape(next(a for a in node.all_input_nodes if p.get(a) is not None))[0]
    per_sample = lambda v: i if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else None  # noqa: E731
    return tuple(per_sample(v) for v in val) if isinstance(val, (tuple, list)) else per_sample(val)


def _convolution_backward(p: BatchDimPropagation, node: fx.Node) -> Info:
    g, x = p.get(node.args[0]), p.get(node.args[1])
    if g is None or x is None or g != x or g.dim != 0 or p.get(node.args[2]) is not None:
        return UNKNOWN
    return (g, None, None)


def _embedding(p: BatchDimPropagation, node: fx.Node) -> Info:
    if p.get(node.args[0]) is not None:
        return UNKNOWN
    return p.get(node.args[1])


def _index_put_accumulate(p: BatchDimPropagation, node: fx.Node) -> Info:
    accumulate = node.target is not aten.index_put.default or (len(node.args) > 3 and node.args[3])
    return None if accumulate and p.get(node.args[0]) is None else UNKNOWN


_RULES = {
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.t.default: _transpose,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.expand.default: _expand,
    aten.slice.Tensor: _along_other_dim,
    aten.select.int: _along_other_dim,
    aten._softmax.default: _along_other_dim,
    aten._log_softmax.default: _along_other_dim,
    aten.cumsum.default: _along_other_dim,
    aten.gather.default: _along_other_dim,
    aten.scatter.value: _along_other_dim,
    aten.scatter.src: _along_other_dim,
    aten.select_scatter.default: _scatter_into,
    aten.slice_scatter.default: _scatter_into,
    aten.cat.default: _cat,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.unbind.int: _unbind,
    aten.mm.default: _mm,
    aten.addmm.default: _mm,
    aten.bmm.default: _mm,
    aten.convolution.default: _per_sample_outputs,
    aten.convolution_backward.default: _convolution_backward,
    aten.native_dropout.default: _per_sample_outputs,
    **{
        getattr(aten, name).default: _per_sample_outputs
        for name in (
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
            "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
        )
        if hasattr(aten, name)
    },
    aten.embedding.default: _embedding,
    aten._unsafe_masked_index_put_accumulate.default: _index_put_accumulate,
    aten.index_put.default: _index_put_accumulate,
    aten.embedding_dense_backward.default: lambda p, n: None,
}
