"""The one Inductor pass manager: runs simigrad's joint-graph passes in a fixed, logged order.

Installed per compile as ``joint_custom_pre_pass`` through ``config_patches`` (never by changing Inductor's
global config). Its ``uuid()`` hashes the source of every file the passes can run (:mod:`.cache_key`: every file
under ``passes/`` and every package module they import) and the region plan the passes read
(:meth:`~.plan.RegionPlan.key`), so Inductor's FX/AOT caches stay correct; on a warm cache the passes do not
run and everything they decided is already in the graph.
"""

from __future__ import annotations

import hashlib
import logging

import torch.fx as fx

from ...compat import CustomGraphPass
from .cache_key import package_digest
from .plan import RegionPlan
from .split_backward import SplitBackwardPass

log = logging.getLogger("simigrad_compile")


class SimigradPassManager(CustomGraphPass):
    """Runs the enabled passes on a joint graph, in order.

    Args:
        region_plan: the compiled region's inputs and options; ``region_plan.mode == "off"`` runs no pass, and a
            pass named in ``region_plan.disabled`` is skipped (logged).
    """

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
        """sha256 of the passes' sources (:func:`~.cache_key.package_digest`) and the plan's key."""
        return hashlib.sha256((package_digest() + self.plan.key()).encode()).hexdigest()
