"""Derive an op's batch behaviour when no rule lists it: run its fake kernel at other batch sizes.

An op qualifies when (1) none of its dim arguments (``dim``, ``dims``, ``dimension``, ...) names a batched
input's batch dim, or leaves the dims unspecified ("the whole tensor"), and (2) re-running it with every batched
input's batch grown from ``B`` to ``B+1`` and ``B+2`` changes each output in at most one dim, by exactly the
batch's share. That output dim then holds the samples in order; an output that does not change is batch-free
(like a loss summed over the batch); any other change (a size that is not the batch's, two dims that follow
the batch, a kernel that rejects the new size) leaves the op unknown, so nothing downstream of it is split.

Some ops act on a whole tensor without a dim argument and keep its shape: those are listed in
:data:`NOT_PER_SAMPLE` and never derived.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
from ...compat import op_schema, quiet_fake_tensor_log, tree_flatten, tree_map

from .batch_lattice import UNKNOWN, BatchDim, Info, is_static, same, size

aten = torch.ops.aten
_DIM_ARG = re.compile(r"^(dim|dims|dim\d|dimension|axis|start_dim|end_dim)$")
NOT_PER_SAMPLE = {
    getattr(aten, name).default
    for name in ("renorm", "_weight_norm_interface", "norm_except_dim", "_pdist_forward", "_pdist_backward",
                 "nonzero", "unique_consecutive", "_unique2", "bincount", "histc", "masked_select")
    if hasattr(aten, name) and hasattr(getattr(aten, name), "default")
}


def derive(prop, node: fx.Node) -> Tuple[Info, Optional[str]]:
    """``(info, why)``: the derived info, or UNKNOWN with the reason."""
    schema = op_schema(node.target)
    if schema is None:
        return UNKNOWN, "no batch-dim rule (not an ATen op)"
    if node.target in NOT_PER_SAMPLE:
        return UNKNOWN, "acts on the whole tensor (mixes samples)"
    if schema.is_mutable:
        return UNKNOWN, "no batch-dim rule, and it mutates an input"
    batched = [a for a in node.all_input_nodes if isinstance(prop.get(a), BatchDim)]
    touched = _dim_args_touching_batch(prop, node, schema, batched)
    if touched:
        return UNKNOWN, f"works along the batch dim ({touched})"
    if any(not (is_static(prop.get(a).inner) and is_static(prop.get(a).outer)) for a in batched):
        return UNKNOWN, "no batch-dim rule, and a symbolic size hides the batch from the probe"
    original = _outputs(node.meta.get("val"))
    if original is None:
        return UNKNOWN, "no batch-dim rule (output is not tensors)"
    probes = [_run(prop, node, batched, prop.batch_symint + k) for k in (1, 2)]
    if any(p is None or len(p) != len(original) for p in probes):
        return UNKNOWN, "no batch-dim rule, and its kernel rejects other batch sizes"
    infos = [_follow(prop, batched, out, [p[j] for p in probes]) for j, out in enumerate(original)]
    if any(i is UNKNOWN for i in infos):
        return UNKNOWN, "no batch-dim rule, and its outputs do not follow the batch"
    val = node.meta.get("val")
    return (tuple(infos) if isinstance(val, (tuple, list)) else infos[0]), None


def _dim_args_touching_batch(prop, node, schema, batched) -> Optional[str]:
    tensors = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]
    first = tensors[0].meta.get("val") if tensors else None
    ndim = first.dim() if isinstance(first, torch.Tensor) else None
    for i, arg in enumerate(schema.arguments):
        if not _DIM_ARG.match(arg.name) or "int" not in str(arg.type).lower() or "symint" in str(arg.type).lower():
            continue
        if i < len(node.args) and not arg.kwarg_only:
            value = node.args[i]
        elif arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        else:
            value = arg.default_value if arg.has_default_value() else None
        dims = [value] if isinstance(value, int) else list(value) if value is not None else []
        if not dims:
            return f"{arg.name} unset: the whole tensor"
        for a in batched:
            n = max(a.meta["val"].dim(), 1)
            if any(d % (ndim or n) == prop.get(a).dim for d in dims):
                return f"{arg.name}={value}"
    return None


def _outputs(val) -> Optional[List[torch.Tensor]]:
    flat = list(val) if isinstance(val, (tuple, list)) else [val]
    if not flat or not all(isinstance(t, torch.Tensor) or t is None for t in flat):
        return None
    return flat


def _run(prop, node, batched, new_batch: int):
    def resized(a):
        if not isinstance(a, fx.Node):
            return a
        val = a.meta.get("val")
        if a not in batched:
            return val
        info = prop.get(a)
        shape = list(val.shape)
        shape[info.dim] = info.outer * new_batch * info.inner
        return torch.empty(shape, dtype=val.dtype, device=val.device)

    fake_mode = prop.fake_mode
    if fake_mode is None:
        return None
    try:  # a kernel that rejects the size logs the exception before raising it: muted
        with quiet_fake_tensor_log(), fake_mode:
            args, kwargs = tree_map(resized, (node.args, node.kwargs))
            return _outputs(node.target(*args, **kwargs))
    except Exception:  # the kernel rejects the size: not a per-sample op we can derive
        return None


def _follow(prop, batched, out, probes) -> Info:
    """Which dim of ``out`` follows the batch (one BatchDim), none (None), or something else (UNKNOWN)."""
    if out is None or any(p is None for p in probes):
        return None if out is None and all(p is None for p in probes) else UNKNOWN
    if any(p.dim() != out.dim() for p in probes):
        return UNKNOWN
    found = None
    for d in range(out.dim()):
        sizes = [size(out.shape[d])] + [size(p.shape[d]) for p in probes]
        if all(same(s, sizes[0]) for s in sizes):
            continue
        match = {prop.get(a) .at(d) for a in batched
                 if all(same(s, prop.get(a).outer * b * prop.get(a).inner)
                        for s, b in zip(sizes, (prop.batch, prop.batch + 1, prop.batch + 2)))}
        if len(match) != 1 or found is not None:
            return UNKNOWN
        found = match.pop()
    return found
