"""The demo's knobs, with defaults sized to finish three runs in about 1.5 minutes on 2 idle CPU cores (warm cache).

The model is small (d=64, context 64: about 0.1M parameters) so that 36k sequences per run fit the time; with
d=128 and context 128 only about 12k sequences fit, a regime where every run is still limited by its number of
steps and any larger batch loses (measured: SimiGrad +3.3% at 1.7x fewer steps, a fixed B=32 +14%)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional


@dataclass(kw_only=True)
class DemoSettings:
    samples: int = 36864
    """Training sequences per run (the same for all three runs)."""
    batch_size: int = 16
    """B0: run 1's fixed batch, SimiGrad's initial batch and its lower bound (``min_batch_size``)."""
    target: float = 0.3
    """SimiGrad's target cosine similarity."""
    max_batch_size: int = 1024
    micro_batch_sizes: tuple = (16,)
    """The ladder of compiled micro-batch shapes of runs 1 and 2. One rung: every batch is 16 x k by
    accumulation, so both runs share one graph (a cold compile costs 20-40 s here, per rung). Run 3 runs its
    exact batch as one micro-batch of its own shape."""
    lr: float = 4e-3
    """AdamW's peak LR at B0; other batches get ``lr * sqrt(B/B0)``."""
    fixed_lr_scaling: str = "sqrt"
    """Run 3's LR: ``sqrt`` (the rule SimiGrad uses, at run 3's batch) or ``none`` (run 1's LR)."""
    warmup: float = 0.05
    """Fraction of the samples with a linear LR warm-up; a cosine decay to zero follows."""
    dim: int = 64
    layers: int = 2
    heads: int = 4
    context: int = 64
    eval_sequences: int = 384
    eval_points: int = 8
    """Validation evaluations per run (for the loss curves); the last is the final loss."""
    compiler: str = "inductor"
    """The simigrad backend's code generator; ``aot_eager`` skips Inductor (fast compile, slow steps); ``eager``
    compiles nothing (the runtime then splits the micro-steps: accumulation >= 2, so B0 needs a rung of B0/2)."""
    progress: bool = True
    threads: Optional[int] = None
    """torch's intra-op threads for the demo (``None``: torch's default). ``--quick`` uses 1: a tiny model's ops only
    wait for a busy machine's second core (measured: 20 s with 1 thread, 124 s with 2, on a loaded 2-core machine)."""
    smoke: bool = False
    """A ``--quick`` run: too few samples and too small a model for its verdicts to mean anything."""

    def as_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "DemoSettings":
        return replace(self, **changes)


QUICK = dict(samples=192, batch_size=4, micro_batch_sizes=(4,), max_batch_size=64, dim=32, layers=1, heads=2,
             context=32, eval_sequences=16, eval_points=2, compiler="aot_eager", threads=1, smoke=True)
"""``--quick``: a smoke run of seconds, not a measurement."""

COST_FULL = ("measured on a 2-core CPU machine: about 1.5 minutes per seed on idle cores with a warm compile cache; "
             "on a busy machine 4 minutes warm, 12.5 minutes the first time (5 of them Inductor's compiles)")
"""The demo's cost, printed at its start (README "Install" gives the same figures)."""
COST_QUICK = ("a smoke run: about 20-25 s on a loaded 2-core machine, with a cold or a warm cache alike (no Inductor); "
              "its verdicts mean nothing at this size")
"""``--quick``'s cost, printed at its start."""
