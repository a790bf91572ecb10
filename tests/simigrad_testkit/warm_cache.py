"""Run twice with one TORCHINDUCTOR_CACHE_DIR: the second process hits the cache; statistics must still come out.

Never imports simigrad_compile before torch.compile: the backend is found through the entry point.
"""
import json
import os
import sys

import torch

from simigrad_testkit.models import TinyGPT, half_reference  # noqa: E402

torch.manual_seed(0)
model = TinyGPT()
idx, tgt = torch.randint(0, 40, (4, 8)), torch.randint(0, 40, (4, 8))
compiled = torch.compile(model, backend="simigrad")
fresh = "simigrad_compile" in sys.modules

import simigrad_compile  # noqa: E402
from simigrad_compile.compile.passes.split_backward import SplitBackwardPass  # noqa: E402

runs = []
original = SplitBackwardPass.__call__
SplitBackwardPass.__call__ = lambda self, graph: (runs.append(1), original(self, graph))[1]
compiled(idx, tgt).backward()
stats = simigrad_compile.gradient_stats(model, reset=True)
d, a, b, cos = half_reference(model, lambda rows: model(idx[rows], tgt[rows]), 4)
print(json.dumps({"imported_by_entry_point": fresh, "pass_runs": len(runs), "cosine": stats.cosine,
                  "reference": cos, "dot": stats.dot, "ref_dot": d, "mode": stats.mode}))
