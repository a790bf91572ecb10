"""The one Inductor pass manager: runs simigrad's joint-graph passes in a fixed, logged order.

Installed per compile as ``joint_custom_pre_pass`` through ``config_patches`` (never by changing Inductor's
global config). Its ``uuid()`` hashes the passes' source and the region plan, so Inductor's FX/AOT caches stay
correct; on a warm cache the passes do not run and everything they decided is already in the graph.
"""

from __future__ import annotations

import hashlib
import inspect
import logging

import torch.fx as fx
from ...compat import CustomGraphPass

from .. import ops
from . import (batch_dims, batch_lattice, batch_probe, batch_rules, combine_halves, index_layout, leaf_operands,
               linear_gradients, plan, split_backward)
from .plan import RegionPlan
from .split_backward import SplitBackwardPass

log = logging.getLogger("simigrad_compile")
_SOURCES = "".join(inspect.getsource(m) for m in (batch_dims, batch_lattice, batch_probe, batch_rules, combine_halves,
                                                   index_layout, leaf_operands, linear_gradients, plan, split_backward,
                                                   ops))


class SimigradPassManager(CustomGraphPass):
    def __init__(self, region_plan: RegionPlan):
        self.plan = region_plan
        passes = [SplitBackwardPass(region_plan)] if region_plan.mode != "off" else []
        self.passes = [p for p in passes if p.name not in region_plan.disabled]
        for name in region_plan.disabled:
            log.warning("simigrad: pass %r disabled by configuration", name)

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            log.debug("simigrad: running pass %s", p.name)
            p(graph)

    def uuid(self) -> str:
        return hashlib.sha256((_SOURCES + self.plan.key()).encode()).hexdigest()
