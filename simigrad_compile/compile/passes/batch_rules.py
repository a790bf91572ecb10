"""Batch-dim rules for the ops whose behaviour the probe (:mod:`.batch_probe`) cannot derive from shapes alone.

These ops take sizes or indices that name the batch (views, ``cat``, matmuls, indexing with ``arange(B)``), or
mix tensors whose batch-free operands line up with the batch (``where(mask[B, ...], ...)``, a class token
``expand``-ed to ``B`` rows). Each rule gets the propagation ``p`` and the node, and returns the node's info;
``p.unknown(why)`` refuses with a reason.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .batch_lattice import BatchDim, Info, batch_size, same, shape_of, size
from .index_layout import IndexLayout

aten, prims = torch.ops.aten, torch.ops.prims


def _norm(d: int, n: int) -> int:
    return d % max(n, 1)


def permute(p, node) -> Info:
    i = p.get(node.args[0])
    perm = [_norm(d, len(node.args[1])) for d in node.args[1]]
    return i.at(perm.index(i.dim))


def transpose(p, node) -> Info:
    i = p.get(node.args[0])
    n = len(shape_of(node.args[0]))
    a, b = (_norm(node.args[1], n), _norm(node.args[2], n)) if node.target is not aten.t.default else (0, 1)
    return i.at({a: b, b: a}.get(i.dim, i.dim))


def unsqueeze(p, node) -> Info:
    i = p.get(node.args[0])
    d = _norm(node.args[1], len(shape_of(node)))
    return i.at(i.dim + (d <= i.dim))


def squeeze(p, node) -> Info:
    i, shape = p.get(node.args[0]), shape_of(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else range(len(shape))
    dims = [dims] if isinstance(dims, int) else dims
    gone = {_norm(d, len(shape)) for d in dims if same(shape[_norm(d, len(shape))], 1)}
    if i.dim in gone:
        return p.unknown("squeezes the batch dim away")
    return i.at(i.dim - sum(d < i.dim for d in gone))


def broadcast(p, node) -> Info:
    return p.broadcast(node)


def select_or_slice(p, node) -> Info:
    """``slice``/``select`` along a non-batch dim; a slice that keeps every sample."""
    i, shape = p.get(node.args[0]), shape_of(node.args[0])
    d = _norm(node.args[1] if len(node.args) > 1 else 0, len(shape))
    if d != i.dim:
        return i.at(i.dim - (d < i.dim)) if node.target is aten.select.int else i
    if node.target is aten.slice.Tensor and same(shape_of(node)[d], shape[d]):
        return i
    return p.unknown("selects some samples")


def scatter_into(p, node) -> Info:
    """``select_scatter``/``slice_scatter(base, src, dim, ...)``: along a non-batch dim, base and src agree."""
    base, src = p.get(node.args[0]), p.get(node.args[1])
    n = len(shape_of(node))
    d = _norm(node.args[2] if len(node.args) > 2 else 0, n)
    if isinstance(src, BatchDim):
        src = src.at(src.dim + (d <= src.dim)) if node.target is aten.select_scatter.default else src
    found = {x for x in (base, src) if x is not None}
    if len(found) != 1:
        return p.unknown("writes samples into other samples' rows")
    (i,) = found
    if isinstance(base, BatchDim) and base != i:
        return p.unknown("writes along the batch dim")
    if i.dim == d:  # only a write of every row along the batch dim (``y[:, 1:] = ...`` under dynamic shapes)
        whole = node.target is aten.slice_scatter.default and same(shape_of(node.args[1])[d], shape_of(node)[d])
        return i if whole and src == i else p.unknown("writes along the batch dim")
    return i


def gather_scatter(p, node) -> Info:
    """gather/scatter/scatter_add/scatter_reduce/index_add/index_copy/index_fill/index_select along ``dim``."""
    target = node.target
    shape = shape_of(node.args[0])
    d = _norm(node.args[1], len(shape))
    index = node.args[2]
    infos = [p.get(a) for a in node.all_input_nodes]
    if target is aten.index_select.default:
        i, ii = p.get(node.args[0]), p.get(index)
        if isinstance(i, BatchDim) and ii is None and i.dim != d:
            return i
        if i is None and isinstance(ii, BatchDim):
            return ii.at(d)
        if isinstance(i, BatchDim) and i.dim == d and p.iota_of(index, lambda io: io.is_identity(shape[d])):
            return i
        return p.unknown("index_select along the batch dim")
    if any(isinstance(i, BatchDim) and i.dim == d for i in infos):
        return p.unknown(f"{target.__name__} along the batch dim")
    if target in (aten.index_add.default, aten.index_copy.default, aten.index_fill.int_Scalar,
                  aten.index_fill.int_Tensor):
        if p.get(index) is not None:
            return p.unknown("index tensor of an index_* op varies with the sample")
    found = {i for i in infos if i is not None}
    if len(found) != 1:
        return p.unknown("operands disagree on the batch dim")
    (i,) = found
    out = shape_of(node)
    return i if same(out[i.dim], batch_size(i, p.batch)) else p.unknown("output does not keep every sample")


def cat(p, node) -> Info:
    parts = node.args[0]
    n = len(shape_of(node))
    d = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), n)
    infos = [p.get(t) for t in parts]
    batched = {i for i in infos if i is not None}
    if len(batched) != 1:
        return p.unknown("parts disagree on the batch dim")
    (i,) = batched
    if i.dim != d:
        return i  # batch-free parts line up with the batch: each output row holds one sample
    sizes = [shape_of(t)[d] for t in parts]
    if all(info == i for info in infos) and all(same(s, sizes[0]) for s in sizes):
        return BatchDim(d, i.inner, i.outer * len(parts))
    return p.unknown("concatenates along the batch dim")


def stack(p, node) -> Info:
    parts = node.args[0]
    d = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape_of(node)))
    batched = {p.get(t) for t in parts} - {None}
    if len(batched) != 1:
        return p.unknown("parts disagree on the batch dim")
    (i,) = batched
    return i.at(i.dim + (d <= i.dim))


def split(p, node) -> Info:
    i = p.get(node.args[0])
    d = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(shape_of(node.args[0])))
    if d == i.dim:
        return p.unknown("splits the batch")
    return tuple([i] * len(node.meta["val"]))


def unbind(p, node) -> Info:
    i = p.get(node.args[0])
    d = _norm(node.args[1] if len(node.args) > 1 else 0, len(shape_of(node.args[0])))
    if d == i.dim:
        return p.unknown("unbinds the batch")
    return tuple([i.at(i.dim - (d < i.dim))] * len(node.meta["val"]))


def repeat(p, node) -> Info:
    i, reps = p.get(node.args[0]), list(node.args[1])
    d = i.dim + len(reps) - len(shape_of(node.args[0]))
    r = size(reps[d])
    return i.at(d) if same(r, 1) else BatchDim(d, i.inner, i.outer * r)


def copy(p, node) -> Info:
    """``copy(self, src)``: the values (and so the samples) are ``src``'s, broadcast to ``self``'s shape."""
    return p.broadcast(node, [node.args[1]])


def constant_pad(p, node) -> Info:
    i, pad = p.get(node.args[0]), list(node.args[1])
    n = len(shape_of(node.args[0]))
    k = n - 1 - i.dim
    if 2 * k + 1 < len(pad) and not (same(size(pad[2 * k]), 0) and same(size(pad[2 * k + 1]), 0)):
        return p.unknown("pads the batch dim")
    return i


def mm(p, node) -> Info:
    """mm/addmm/bmm: batch on the kept rows/cols passes through; batch on the contracted dim is a
    contraction over the batch (no batch in the result); batch-free operands line up with it."""
    if node.target is aten.addmm.default and p.get(node.args[0]) is not None:
        return p.unknown("addmm adds a batched bias")
    a, b = p.get(node.args[-2]), p.get(node.args[-1])
    off = 1 if node.target is aten.bmm.default else 0
    if off and any(x is not None and x.dim == 0 for x in (a, b)):
        if all(x is None or x == (a or b) for x in (a, b)):
            return a or b
        return p.unknown("bmm operands disagree on the batch")
    contracted = [x for x, k in ((a, off + 1), (b, off)) if x is not None and x.dim == k]
    kept = [x for x, k in ((a, off + 1), (b, off)) if x is not None and x.dim != k]
    if contracted and not kept:
        return None if len({x.at(0) for x in contracted}) == 1 else p.unknown("contracts two different batches")
    if len(kept) == 1 and not contracted:
        x = kept[0]
        return x if x is a else x.at(off + 1)
    return p.unknown("matmul mixes samples (batch on both operands' kept dims)")


def per_sample(p, node) -> Info:
    """Attention and convolutions: every batched operand has the batch in the same leading dim, which every
    output with that leading size keeps (weights, biases and masks may be batch-free)."""
    found = {p.get(a) for a in node.all_input_nodes} - {None}
    if len(found) != 1:
        return p.unknown("operands disagree on the batch dim")
    (i,) = found
    if node.target is aten.convolution.default and any(p.get(a) is not None for a in node.args[1:3]):
        return p.unknown("convolution with a batched weight")
    ref = next(shape_of(a) for a in node.all_input_nodes if p.get(a) is not None)
    leading = ref[: i.dim + 1]
    val = node.meta.get("val")

    def each(v):
        if not isinstance(v, torch.Tensor) or v.dim() <= i.dim:
            return None
        return i if all(same(size(s), t) for s, t in zip(v.shape[: i.dim + 1], leading)) else None

    return tuple(each(v) for v in val) if isinstance(val, (tuple, list)) else each(val)


def convolution_backward(p, node) -> Info:
    g, x = p.get(node.args[0]), p.get(node.args[1])
    if g is None or x is None or g != x or g.dim != 0 or p.get(node.args[2]) is not None:
        return p.unknown("convolution_backward operands disagree on the batch")
    return (g, None, None)


def embedding(p, node) -> Info:
    if p.get(node.args[0]) is not None:
        return p.unknown("embedding table varies with the sample")
    return p.get(node.args[1])


def embedding_dense_backward(p, node) -> Info:
    return None


def embedding_bag(p, node) -> Info:
    """``_embedding_bag``: every bag is one sample. Either 2-D input (indices ``[B*L]`` with the batch every
    ``L`` entries, offsets ``arange(0, B*L, L)``), or batched offsets into batch-free indices."""
    weight, indices, offsets = node.args[:3]
    psw = node.args[6] if len(node.args) > 6 else node.kwargs.get("per_sample_weights")
    last = node.args[7] if len(node.args) > 7 else node.kwargs.get("include_last_offset", False)
    wi, ii, oi = p.get(weight), p.get(indices), p.get(offsets)
    if wi is not None:
        return p.unknown("embedding_bag table varies with the sample")
    if isinstance(ii, BatchDim) and ii.dim == 0 and same(ii.outer, 1) and oi is None and not last:
        fixed = p.iota_of(offsets, lambda io: same(io.start, 0) and same(io.step, ii.inner)
                          and same(io.length, p.batch))
        if fixed and p.get(psw) in (None, ii):
            bag = BatchDim(0)
            return (bag, ii, bag, bag)
        return p.unknown("embedding_bag offsets do not cut the batched indices into one bag per sample")
    if ii is None and isinstance(oi, BatchDim) and oi == BatchDim(0) and p.get(psw) is None and not last:
        bag = BatchDim(0)
        return (bag, None, bag, bag)
    return p.unknown("embedding_bag bags are not one per sample (use 2-D input, or offsets as the batched input)")


def embedding_bag_backward(p, node) -> Info:
    return None


def index(p, node) -> Info:
    """``index``/``_unsafe_index``/``_unsafe_masked_index``: the batch stays where an un-indexed batch dim
    lands, where ``arange(B)`` indexes the batch dim, or where batched index tensors put it."""
    masked = node.target is aten._unsafe_masked_index.default
    src, indices = node.args[0], list(node.args[2] if masked else node.args[1])
    tensors = [t for t in indices if isinstance(t, fx.Node)]
    if any(t.meta["val"].dtype in (torch.bool, torch.uint8) for t in tensors):
        return p.unknown("boolean-mask indexing")
    layout = IndexLayout(len(shape_of(src)), [shape_of(t) if isinstance(t, fx.Node) else None for t in indices])
    candidates = []
    si = p.get(src)
    if isinstance(si, BatchDim):
        out = layout.of_self(si.dim)
        if out is not None:
            candidates.append(si.at(out))
        else:
            at = p.iota_of(indices[si.dim], lambda io: io.is_identity(shape_of(src)[si.dim]))
            if at is None:
                return p.unknown("indexes the batch dim with indices other than arange(B)")
            candidates.append(si.at(layout.of_index(len(shape_of(indices[si.dim])), at.dim)))
    for t in tensors:
        ti = p.get(t)
        if isinstance(ti, BatchDim):
            candidates.append(ti.at(layout.of_index(len(shape_of(t)), ti.dim)))
    mi = p.get(node.args[1]) if masked else None
    if isinstance(mi, BatchDim):  # the mask broadcasts against the output
        candidates.append(mi.at(mi.dim + layout.ndim - len(shape_of(node.args[1]))))
    if len(set(candidates)) != 1:
        return p.unknown("indices and indexed tensor put the batch in different dims")
    return candidates[0]


def index_put(p, node) -> Info:
    """``index_put``/``_unsafe_index_put``/``_unsafe_masked_index_put_accumulate``: per-sample when the batch
    lands on an un-indexed dim or on a dim indexed by ``arange(B)``; a sum over the batch (no batch in the
    result) when accumulating into batch-free zeros at indices shared by the samples."""
    masked = node.target is aten._unsafe_masked_index_put_accumulate.default
    base, indices = node.args[0], list(node.args[2] if masked else node.args[1])
    values = node.args[3] if masked else node.args[2]
    accumulate = masked or (len(node.args) > 3 and node.args[3]) or node.kwargs.get("accumulate", False)
    tensors = [t for t in indices if isinstance(t, fx.Node)]
    if any(t.meta["val"].dtype in (torch.bool, torch.uint8) for t in tensors):
        return p.unknown("boolean-mask index_put")
    shape = shape_of(base)
    layout = IndexLayout(len(shape), [shape_of(t) if isinstance(t, fx.Node) else None for t in indices])
    candidates, block = [], set()
    bi = p.get(base)
    if isinstance(bi, BatchDim):
        on_self = layout.of_self(bi.dim) is not None
        if not on_self and p.iota_of(indices[bi.dim], lambda io: io.is_identity(shape[bi.dim])) is None:
            return p.unknown("index_put along the batch dim")
        candidates.append(bi)
    for right_aligned in [values] + ([node.args[1]] if masked else []):  # values and mask fit the indexed shape
        vi = p.get(right_aligned)
        if isinstance(vi, BatchDim):
            r = vi.dim + layout.ndim - len(shape_of(right_aligned))
            k = layout.block_position(r)
            if k is None:
                candidates.append(vi.at(layout.self_dim_of(r)))
            else:
                block.add(vi.at(k))
    for t in tensors:
        ti = p.get(t)
        if isinstance(ti, BatchDim):
            block.add(ti.at(ti.dim + layout.block - len(shape_of(t))))
    if len(block) > 1:
        return p.unknown("index_put operands put the batch in different dims")
    if block:
        (b,) = block
        for d, t in enumerate(indices):
            io = p.iota.get(t) if isinstance(t, fx.Node) else None
            if io is not None and io.is_identity(shape[d]) and io.dim + layout.block - len(shape_of(t)) == b.dim:
                candidates.append(b.at(d))
                break
        else:
            if candidates or not accumulate:
                return p.unknown("index_put writes several samples into the same rows")
            return None
    if len(set(candidates)) != 1:
        return p.unknown("index_put operands put the batch in different dims")
    return candidates[0]


def value_free(p, node) -> Info:
    """``zeros_like``, ``new_zeros``, ``sym_size``...: take only a shape (or nothing) from their input."""
    return None


RULES = {
    aten.permute.default: permute,
    aten.transpose.int: transpose,
    aten.t.default: transpose,
    aten.unsqueeze.default: unsqueeze,
    aten.squeeze.dim: squeeze,
    aten.squeeze.dims: squeeze,
    aten.squeeze.default: squeeze,
    aten.expand.default: broadcast,
    aten.slice.Tensor: select_or_slice,
    aten.select.int: select_or_slice,
    aten.select_scatter.default: scatter_into,
    aten.slice_scatter.default: scatter_into,
    aten.cat.default: cat,
    aten.stack.default: stack,
    aten.split.Tensor: split,
    aten.split_with_sizes.default: split,
    aten.unbind.int: unbind,
    aten.repeat.default: repeat,
    aten.copy.default: copy,
    aten.constant_pad_nd.default: constant_pad,
    aten.mm.default: mm,
    aten.addmm.default: mm,
    aten.bmm.default: mm,
    aten.convolution.default: per_sample,
    aten.convolution_backward.default: convolution_backward,
    aten.native_dropout.default: per_sample,
    aten.embedding.default: embedding,
    aten.embedding_dense_backward.default: embedding_dense_backward,
    aten._embedding_bag.default: embedding_bag,
    aten._embedding_bag_forward_only.default: embedding_bag,
    aten._embedding_bag_dense_backward.default: embedding_bag_backward,
    aten._embedding_bag_backward.default: embedding_bag_backward,
    aten.index.Tensor: index,
    aten._unsafe_index.Tensor: index,
    aten._unsafe_masked_index.default: index,
    aten.index_put.default: index_put,
    aten._unsafe_index_put.default: index_put,
    aten._unsafe_masked_index_put_accumulate.default: index_put,
    **{op: gather_scatter for op in (
        aten.gather.default, aten.scatter.src, aten.scatter.value, aten.scatter_add.default,
        aten.scatter_reduce.two, aten.index_add.default, aten.index_copy.default, aten.index_select.default,
        aten.index_fill.int_Scalar, aten.index_fill.int_Tensor)},
    **{op: value_free for op in (
        aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
        aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
        aten.new_empty_strided.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
        aten.sym_storage_offset.default, aten.rand_like.default, aten.randn_like.default)},
    **{
        getattr(aten, name).default: per_sample
        for name in (
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
            "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
            "_scaled_dot_product_attention_math",
        )
        if hasattr(aten, name)
    },
}
