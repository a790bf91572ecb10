"""The ``simigrad`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point).

``torch.compile(model, backend="simigrad", options={...})``: the options form one
:class:`~simigrad_compile.config.SimigradConfig`. In group mode ``batch`` (or ``auto`` outside data
parallelism) the joint graph goes through :class:`~simigrad_compile.compile.passes.manager.SimigradPassManager`, and
Inductor (or ``aot_eager``, for debugging) generates the code as usual.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..config import from_mapping
from .passes.manager import SimigradPassManager
from .passes.plan import plan_region
from . import ops as _ops  # noqa: F401  (registers the simigrad:: graph ops)
from .region import Region

log = logging.getLogger("simigrad_compile")


def _split_mode(group_mode: str) -> str:
    if group_mode == "batch":
        return "batch"
    if group_mode in ("microsteps", "ranks"):
        return "off"
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return "off" if distributed and torch.distributed.get_world_size() >= 2 else "auto"


def simigrad_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None, mode=None, **_):
    config = from_mapping(options)
    plan = plan_region(gm, example_inputs, config, _split_mode(config.group_mode))
    manager = SimigradPassManager(plan)
    region = Region(plan.params) if manager.passes and plan.params else None
    if config.compiler == "aot_eager":
        compiled = _aot_eager(gm, example_inputs, manager)
    else:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(mode)) if mode else {}
        if config.cuda_graphs:
            patches["triton.cudagraphs"] = True
        if manager.passes:
            patches["joint_custom_pre_pass"] = manager
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
    return region.wrap(compiled) if region is not None else compiled


def _aot_eager(gm, example_inputs, manager: SimigradPassManager):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition
    from torch._inductor import lowering  # noqa: F401  (Inductor's decompositions, max-pool's among them, use it)
    from torch._inductor.decomposition import select_decomp_table

    def partition(joint, joint_inputs, **kwargs):
        manager(joint.graph)
        joint.recompile()
        return default_partition(joint, joint_inputs, **kwargs)

    backend = aot_autograd(fw_compiler=_boxed_nop, bw_compiler=_boxed_nop, partition_fn=partition,
                           decompositions=select_decomp_table())
    return backend(gm, example_inputs)


def _boxed_nop(gm, example_inputs):
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(gm.forward)
