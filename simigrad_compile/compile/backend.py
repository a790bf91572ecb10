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

from .. import compat, envvars
from ..config import from_mapping, resolve_group_mode
from .input_sizes import SPECIALIZED, batch_checks, specialized
from .passes.manager import SimigradPassManager
from .passes.plan import plan_region
from . import ops as _ops  # noqa: F401  (registers the simigrad:: graph ops)
from .region import Region

log = logging.getLogger("simigrad_compile")


def _split_mode(group_mode: str) -> str:
    """The split pass's mode for a graph compiled in this process: ``batch`` (split, refusals logged), ``auto``
    (split where sound) or ``off`` (the statistics come from micro-steps or ranks)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    mode = resolve_group_mode(group_mode, torch.distributed.get_world_size() if distributed else 1)
    return {"batch": "batch", "auto": "auto"}.get(mode, "off")


def simigrad_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None, mode=None, **_):
    config = from_mapping(options, base=envvars.config_from_env())  # options over SIMIGRAD_* over defaults
    plan = plan_region(gm, example_inputs, config, _split_mode(config.group_mode))
    manager = SimigradPassManager(plan)
    region = Region(plan.params) if manager.passes and plan.params else None
    if config.compiler == "aot_eager":
        compiled = compat.aot_eager_compile(gm, example_inputs, manager)
    else:
        patches = {"triton.cudagraphs": True} if config.cuda_graphs else {}
        if manager.passes:
            patches["joint_custom_pre_pass"] = manager
        compiled = compat.inductor_compile(gm, example_inputs, mode, patches)
    _warn_specialized(gm, example_inputs, plan)
    return region.wrap(compiled, batch_checks(gm, plan)) if region is not None else compiled


def _warn_specialized(gm, example_inputs, plan) -> None:
    found = specialized(gm, example_inputs, plan)
    if not found:
        return
    SPECIALIZED.update(name for name, _ in found)
    named = ", ".join(f"{name} ({n})" for name, n in found)
    log.warning("simigrad: symbolic_batch: the model's code made the batch size of %s a constant in this graph (a "
                "branch on it, or a shape computed from it; TORCH_LOGS=dynamic shows where), so this graph runs "
                "that size only and other sizes compile graphs of their own. Where every size does, the compile "
                "cost is the static ladder's: set symbolic_batch=False.", named)
