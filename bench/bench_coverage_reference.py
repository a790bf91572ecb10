"""Independent fp64 references for the census: the two halves' gradients g1, g2 and the full gradient g.

Two definitions, one per kind of model, both with ``g1 + g2 == g`` for a loss that is a mean over the batch:

- **Per-sample models** (no BatchNorm in training mode): two separate eager forward+backward passes on the
  first ``floor(B/2)`` and the last ``ceil(B/2)`` samples, each loss scaled by ``|half| / B``.
- **BatchNorm in training mode** couples the samples through the batch statistics, so two half-batch passes
  compute a different function. There g1 and g2 are the halves' *contributions* to the full-batch gradient: the
  gradient of the full-batch loss with respect to a copy of each parameter used only by that half's rows (the
  semantics the split pass documents). It is computed from one full-batch pass: every module that owns
  parameters records its inputs and the gradient ``G`` of the loss with respect to its output; the half-h
  contribution of its parameters is the vector-Jacobian product of the module's output rows h with ``G``'s rows
  h, the inputs held fixed. This is exact where the owning module applies its parameters to each row
  separately (convolutions, linear layers, norms, BatchNorm's affine part applied after its statistics); a
  module that owns parameters *and* contains a BatchNorm, or an output without the batch in dim 0, has no
  such reference and raises :class:`ReferenceUndefined`. The result is checked: ``g1 + g2`` must equal the
  full gradient of the same pass, or it raises.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
from torch.utils import _pytree as pytree

Grads = Dict[str, torch.Tensor]


class ReferenceUndefined(Exception):
    """No independent reference exists for this model's split (named cause)."""


def rows_of(batch: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def has_train_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _grads(model: torch.nn.Module) -> Grads:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def double_copy(model: torch.nn.Module, batch: dict) -> Tuple[torch.nn.Module, dict]:
    model64 = copy.deepcopy(model).double()
    return model64, {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}


def half_batch_reference(model64, loss_of, batch64: dict, b: int) -> Tuple[Grads, Grads, Grads]:
    halves = []
    for rows in (slice(0, b // 2), slice(b // 2, b)):
        model64.zero_grad(set_to_none=True)
        (loss_of(model64, rows_of(batch64, rows)) * ((rows.stop - rows.start) / b)).backward()
        halves.append(_grads(model64))
    model64.zero_grad(set_to_none=True)
    loss_of(model64, batch64).backward()
    full = _grads(model64)
    model64.zero_grad(set_to_none=True)
    return halves[0], halves[1], full


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def contributions_reference(model64, loss_of, batch64: dict, b: int) -> Tuple[Grads, Grads, Grads]:
    names = {id(p): n for n, p in model64.named_parameters()}
    owners = [(mn, m) for mn, m in model64.named_modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    for mn, m in owners:
        inner = [c for c in m.modules() if c is not m and isinstance(c, torch.nn.modules.batchnorm._BatchNorm)]
        if inner and has_train_batchnorm(m):
            raise ReferenceUndefined(f"module {mn or '<root>'} owns parameters and contains a BatchNorm")
    calls: list = []  # (module name, module, args, kwargs, outputs)
    handles = []
    for mn, m in owners:
        def pre(mod, args, kwargs, mn=mn):
            clone = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            calls.append([mn, mod, pytree.tree_map(clone, args), pytree.tree_map(clone, kwargs), None])

        def post(mod, args, kwargs, out, mn=mn):
            rec = next(c for c in reversed(calls) if c[1] is mod and c[4] is None)
            rec[4] = _tensors(out)
            # later in-place ops (ReLU(inplace), +=) then modify the clone, not the recorded output
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        loss = loss_of(model64, batch64)
    finally:
        for h in handles:
            h.remove()
    params = [p for p in model64.parameters() if p.requires_grad]
    outs = [t for c in calls for t in c[4] if t.requires_grad]
    got = torch.autograd.grad(loss, params + outs, allow_unused=True)
    full = {names[id(p)]: (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, got)}
    out_grad = {id(t): g for t, g in zip(outs, got[len(params):])}
    parts = [{n: torch.zeros_like(g) for n, g in full.items()} for _ in range(2)]
    for mn, mod, args, kwargs, recorded in calls:
        grads = [out_grad.get(id(t)) if t.requires_grad else None for t in recorded]
        if all(g is None for g in grads):
            continue
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        for half, rows in enumerate((slice(0, b // 2), slice(b // 2, b))):
            again = _tensors(mod(*args, **kwargs))
            terms = []
            for t, g in zip(again, grads):
                if g is None:
                    continue
                if t.dim() == 0 or t.shape[0] != b:
                    raise ReferenceUndefined(f"module {mn} has an output of shape {tuple(t.shape)}: no batch in dim 0")
                terms.append((t[rows] * g[rows]).sum())
            pg = torch.autograd.grad(sum(terms), own, allow_unused=True)
            for p, g in zip(own, pg):
                if g is not None:
                    parts[half][names[id(p)]] += g
    for n, g in full.items():
        err = (parts[0][n] + parts[1][n] - g).norm().item()
        scale = g.norm().item() + parts[0][n].norm().item() + parts[1][n].norm().item()  # halves may cancel
        if err > 1e-9 * scale and err > 1e-30:
            raise ReferenceUndefined(f"contributions of {n} do not add up to its gradient (used outside its module?)")
    return parts[0], parts[1], full
