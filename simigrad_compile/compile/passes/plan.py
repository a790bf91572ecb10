"""What the passes need to know about a compiled region's inputs, taken from Dynamo's graph.

The joint graph's ``primals_i`` is Dynamo placeholder ``i``. A :class:`RegionPlan` says for each one whether it
is a parameter (and its name), a user input with a batch dim, or something else (a buffer, a constant). It is
deterministic across processes, so it can enter the passes' cache key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ...config import SimigradConfig

_PART = re.compile(r"\.?_(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class InputRole:
    kind: str
    """``param``, ``input`` or ``other``."""
    name: str
    batch_dim: Optional[int] = None


@dataclass(frozen=True)
class RegionPlan:
    roles: Tuple[InputRole, ...]
    mode: str
    """``batch`` (split or raise), ``auto`` (split or fall back), ``off`` (no split pass)."""
    bucket_bytes: int
    disabled: Tuple[str, ...] = ()
    stats_sum: str = "auto"
    split_contraction: str = "separate"

    def key(self) -> str:
        return repr((self.roles, self.mode, self.bucket_bytes, self.disabled, self.stats_sum, self.split_contraction))

    @property
    def params(self) -> List[Tuple[int, str]]:
        return [(i, r.name) for i, r in enumerate(self.roles) if r.kind == "param"]


def _source(node: torch.fx.Node):
    grapharg = node.meta.get("grapharg")
    return getattr(grapharg, "source", None)


def _is_user_input(source) -> bool:
    while source is not None:
        cls = type(source).__name__
        if cls == "LocalSource":
            return True
        if "Attr" in cls or "NNModule" in cls or "Global" in cls:
            return False
        source = getattr(source, "base", None)
    return False


def _param_name(source, fallback: str) -> str:
    if source is None:
        return fallback
    text = source.name() if callable(source.name) else source.name
    parts = [a or b for a, b in _PART.findall(text.split("]", 1)[1] if text.startswith("L[") else text)]
    return ".".join(parts) or text


def _local_name(source) -> str:
    while source is not None and type(source).__name__ != "LocalSource":
        source = getattr(source, "base", None)
    return getattr(source, "local_name", "")


def _user_dim(config: SimigradConfig, index: int, name: str) -> Optional[int]:
    dims = config.batch_dim
    if isinstance(dims, int):
        return dims
    if isinstance(dims, dict):
        return dims.get(name, 0)
    return dims[index] if index < len(dims) else 0


def plan_region(gm: torch.fx.GraphModule, example_inputs: Sequence, config: SimigradConfig, mode: str) -> RegionPlan:
    roles, user_index = [], 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        source = _source(node)
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
