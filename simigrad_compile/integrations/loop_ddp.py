"""``SIMIGRAD=1`` on many processes: the DistributedDataParallel modules of an ordinary DDP loop, and their sync.

The loop stays as written (``DDP(model)``, a ``DistributedSampler``, its ``DataLoader``); each rank adapts the
number of its loader's batches per step, so the global batch is ``world x accumulation x`` the loader's batch.

* Every ``DistributedDataParallel`` built while the hooks are installed is recorded (a wrapper of its
  ``__init__``); a door takes the one whose parameters are its optimizer's.
* DDP reduces once per step. Right after each fetch of a batch (so before its forward, as ``no_sync`` would be
  entered), :func:`before_forward` sets the module's ``require_backward_grad_sync``: True only for the batch that
  ends the core's window, the plan's last micro-batch or the loader iterator's last batch (the epoch's tail ends
  the window there, and ``DistributedSampler`` gives every rank the same number of batches). Before the first
  ``optimizer.step()`` (no door yet) the first window's plan decides, computed from the same config.
* The split-group reduction (``ranks`` statistics, the bytes of plain DDP) is installed at the first fetch,
  before the first backward.
* The window's running gradient, held aside between micro-steps, goes back into ``p.grad`` right before the
  synchronising backward (:func:`fold`, from the ``Tensor.backward`` observer of :mod:`.auto_loop`),
  so that DDP reduces the whole window's gradient, as under ``no_sync`` in a hand loop.
"""

from __future__ import annotations

import weakref
import torch

from .. import compat
from ..config import SimigradConfig, resolve_group_mode

_ddps: "weakref.WeakSet" = weakref.WeakSet()
_steered: "weakref.WeakSet" = weakref.WeakSet()
_original_init = None


def world() -> tuple:
    """(world size, rank) of the default process group; (1, 0) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def install() -> None:
    """Record every ``DistributedDataParallel`` built from now on (idempotent)."""
    global _original_init
    if _original_init is not None:
        return
    from torch.nn.parallel import DistributedDataParallel

    _original_init = DistributedDataParallel.__init__

    def __init__(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        _ddps.add(self)

    DistributedDataParallel.__init__ = __init__


def uninstall() -> None:
    global _original_init
    if _original_init is not None:
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel.__init__ = _original_init
        _original_init = None
    _ddps.clear()
    _steered.clear()


def recorded() -> list:
    return list(_ddps)


def find(optimizer: torch.optim.Optimizer):
    """The recorded DDP module whose parameters the optimizer steps, or None."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for ddp in _ddps:
        if any(id(p) in ids for p in ddp.module.parameters()):
            return ddp
    return None


def check_mode(config: SimigradConfig, world_size: int) -> None:
    mode = resolve_group_mode(config.group_mode, world_size)
    if mode != "ranks":
        raise RuntimeError(f"simigrad: SIMIGRAD=1 on {world_size} processes takes its statistics from the two halves "
                           f"of the ranks; group_mode={config.group_mode!r} resolves to {mode!r}: unset "
                           "SIMIGRAD_GROUP_MODE (or set it to 'ranks')")


def first_plan_syncs(config: SimigradConfig, world_size: int) -> bool:
    """Whether the first step (before any door exists) is one micro-batch: the core's first plan, from the same
    config (B0 clamped by the controller, planned by the ladder)."""
    from ..runtime.controller import BatchSizeController
    from ..runtime.ladder import Ladder

    target = BatchSizeController(config, config.batch_size).batch_size
    return Ladder(config, world_size).plan(target).accumulation == 1


def iterator_ends(iterator) -> bool:
    """The batch just fetched is the iterator's last."""
    left = compat.batches_left(iterator)
    return left is not None and left <= 0


def before_forward(ddp, sync: bool) -> None:
    """Set whether the coming backward reduces (installs the split reduction at the first call)."""
    from ..distributed import enable_ddp

    enable_ddp(ddp)  # idempotent; before the first backward
    ddp.require_backward_grad_sync = sync


def steer(iterator, micro, doors, config: SimigradConfig, door_config) -> None:
    """Right after ``iterator`` yielded a batch of ``micro`` samples, before its forward: whether its backward
    reduces, for every recorded DDP module (module docstring). ``door_config(micro, world)``: a door's config."""
    world_size, _ = world()
    if world_size < 2:
        return
    tail = iterator_ends(iterator)
    for ddp in recorded():
        door = next((d for d in doors if d.ddp is ddp), None)
        if door is None:
            if not claim(ddp):
                continue  # another door (AdaptiveBatching) steers this module
            check_mode(config, world_size)
            sync = tail or micro is None or first_plan_syncs(door_config(micro, world_size), world_size)
        else:
            state = door.run.state
            sync = tail or state.micro_step >= state.micro_steps - 1
        before_forward(ddp, sync)


def fold(door) -> None:
    """DDP reduces ``p.grad`` in the coming backward: put the door's running gradient (held aside) back into it,
    so that the reduction, and the ranks statistics, cover the whole window; the backward adds the fresh one."""
    aside, door.aside, door.folded = door.aside or {}, None, {}
    for p in door.run.params:
        held = aside.get(id(p))
        if held is None:
            continue
        if p.grad is not None:
            held.add_(p.grad)
        p.grad = door.folded[id(p)] = held


def unfold(door) -> None:
    """After the reducing backward: ``p.grad`` back in the tensor the window saw (autograd may have accumulated out
    of place)."""
    folded, door.folded = door.folded, None
    for p in door.run.params:
        held = folded.get(id(p))
        if held is not None and p.grad is not None and p.grad is not held:
            held.copy_(p.grad)
            p.grad = held


def check_reduced(door) -> None:
    """The micro-step that ends the window: its backward must have reduced the window's gradient across ranks,
    else every rank would step with its own gradient and the ranks would drift apart."""
    synced, door.synced = door.synced, None
    if synced:
        return
    why = ("its backward ran under DDP's no_sync (a loop that fetches batches ahead of their forward, or "
           "accumulates over several backward passes per optimizer.step())" if synced is False else
           "no loss.backward() was seen since the last step (torch.autograd.backward or autograd.grad)")
    door.run.discard_step()
    door.aside = door.folded = None
    raise RuntimeError(f"simigrad: SIMIGRAD=1 on many processes: the batch that ends a step was not reduced across "
                       f"ranks: {why}. Fetch each batch right before its forward, call loss.backward() and "
                       "optimizer.step() once per batch, or set SIMIGRAD_AUTO_LOOP=false")


def claim(ddp) -> bool:
    """True when this door steers ``ddp``: the first time it sees it, unless another door (``AdaptiveBatching``,
    which installs the split reduction when it is built) already did; such a module is forgotten."""
    if ddp in _steered:
        return True
    from ..distributed import reduction

    if reduction(ddp) is not None:
        _ddps.discard(ddp)
        return False
    _steered.add(ddp)
    return True


__all__ = ["before_forward", "check_mode", "check_reduced", "claim", "find", "first_plan_syncs", "fold", "install",
           "iterator_ends", "recorded", "steer", "unfold", "uninstall", "world"]
