"""What the passes need to know about a compiled region's inputs, taken from Dynamo's graph.

The joint graph's ``primals_i`` is Dynamo placeholder ``i``. A :class:`RegionPlan` says for each one whether it
is a parameter (and its name), a user input with a batch dim, or something else (a buffer, a constant). It is
deterministic across processes, so it can enter the passes' cache key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import torch

from ...compat import dynamo_source, source_base, source_is_attribute, source_is_local
from ...config import SimigradConfig

_PART = re.compile(r"\.?_(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class InputRole:
    """What one input of the compiled region is."""

    kind: str
    """``param``, ``input`` or ``other``."""
    name: str
    """The parameter's name in the module (``fc.weight``), the input's local name, or the placeholder's."""
    batch_dim: Optional[int] = None
    """An input's batch dim (None for a 0-dim input and for every other kind)."""


@dataclass(frozen=True)
class RegionPlan:
    """Everything the passes read about one compiled region: its inputs' roles and the options that apply.

    Every field enters the passes' cache key (:meth:`key`)."""

    roles: Tuple[InputRole, ...]
    mode: str
    """``batch`` (split or raise), ``auto`` (split or fall back), ``off`` (no split pass)."""
    bucket_bytes: int
    """The most bytes of gradient halves per fused statistics launch (``stats_bucket_mb``)."""
    disabled: Tuple[str, ...] = ()
    """Names of passes not to run."""
    stats_sum: str = "auto"
    """``graph``, ``kernel`` or ``auto`` (graph ops on CPU): see ``SimigradConfig.stats_sum``."""
    split_contraction: str = "separate"
    """``separate`` or ``accumulate``: see :mod:`.combine_halves`."""

    def key(self) -> str:
        """Every field's value, in field order: the part of the passes' cache key that the options make."""
        return repr(tuple(getattr(self, f.name) for f in fields(self)))

    @property
    def params(self) -> List[Tuple[int, str]]:
        return [(i, r.name) for i, r in enumerate(self.roles) if r.kind == "param"]


def _is_user_input(source) -> bool:
    """``source`` reads data the caller passed in (a local of the frame, or a part of one), not a module's or a
    global's member."""
    while source is not None:
        if source_is_local(source):
            return True
        if source_is_attribute(source):
            return False
        source = source_base(source)
    return False


def _param_name(source, fallback: str) -> str:
    if source is None:
        return fallback
    text = source.name() if callable(source.name) else source.name
    parts = [a or b for a, b in _PART.findall(text.split("]", 1)[1] if text.startswith("L[") else text)]
    return ".".join(parts) or text


def _local_name(source) -> str:
    while source is not None and not source_is_local(source):
        source = source_base(source)
    return getattr(source, "local_name", "")


def _user_dim(config: SimigradConfig, index: int, name: str) -> Optional[int]:
    dims = config.batch_dim
    if isinstance(dims, int):
        return dims
    if isinstance(dims, dict):
        return dims.get(name, 0)
    return dims[index] if index < len(dims) else 0


def plan_region(gm: torch.fx.GraphModule, example_inputs: Sequence, config: SimigradConfig, mode: str) -> RegionPlan:
    """The plan of Dynamo's graph ``gm``: each placeholder's role (a ``Parameter`` example input is a parameter;
    a tensor the caller passed is an input, with its ``config.batch_dim``), and ``config``'s options."""
    roles, user_index = [], 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        source = dynamo_source(node)
        if isinstance(value, torch.nn.Parameter):
            roles.append(InputRole("param", _param_name(source, node.name)))
        elif isinstance(value, torch.Tensor) and _is_user_input(source):
            name = _local_name(source)
            dim = _user_dim(config, user_index, name)
            roles.append(InputRole("input", name or node.name, dim if value.dim() > 0 else None))
            user_index += 1
        else:
            roles.append(InputRole("other", node.name))
    return RegionPlan(tuple(roles), mode, int(config.stats_bucket_mb * 2**20), tuple(config.disabled_passes),
                      config.stats_sum,
                      config.split_contraction)
