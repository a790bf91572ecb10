"""A door's run, replayed on the fp64 plain loop (:class:`loop_reference.Reference`) step by step.

A door's run is recorded as a :class:`Trace`: every micro-step the door saw (which samples, with which weights the
user's loss summed them, what the loop did to that micro-batch's gradient, the frozen parameters), the core's
history, and the parameters after each history record. :func:`check_trace` walks the history: each record's
samples are the next micro-steps of the trace (no sample left out, none taken twice), and the reference computes,
in fp64 and by hand, each micro-step's gradient, the step's mean gradient, its loss, norm, the microsteps cosine
of its two halves, then skips the step (a non-finite loss) or applies it (clipping, LR schedule and ``sqrt(B/B0)``
scaling, the user's optimizer). The door's parameters after every record must be the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from simigrad_testkit.loop_reference import Reference, clip_, first_half, flat, loss_of, total_norm

RTOL, ATOL = 1e-9, 1e-10


@dataclass
class Micro:
    """One micro-step as the door saw it."""

    parts: List[Tuple[torch.Tensor, float]]
    """The loss of the micro-step: ``sum(w * mean loss over the samples idx)`` over its ``(idx, w)`` parts."""
    clip: Optional[tuple] = None
    """The loop's own clipping of this micro-step's gradient (``SIMIGRAD=1``: ``clip_grad_norm_`` before step)."""
    frozen: frozenset = frozenset()
    """The parameter names without a gradient."""
    epoch_end: bool = False
    """The epoch's last micro-step (a door that iterates the user's loader cuts the window there)."""
    factor: float = 1.0
    """The user's LR schedule factor when this micro-step's ``step()`` ran (``SIMIGRAD=1``)."""

    @property
    def samples(self) -> int:
        return sum(len(idx) for idx, _ in self.parts)


@dataclass
class Trace:
    micro: List[Micro] = field(default_factory=list)
    history: List[dict] = field(default_factory=list)
    snaps: List[torch.Tensor] = field(default_factory=list)
    """The parameters after each history record (skipped steps included)."""

    def snapshot(self, history, model) -> None:
        """Call after each of the loop's steps: one snapshot per new record."""
        while len(self.snaps) < len(history):
            self.snaps.append(flat(model))


def _micro_grad(ref: Reference, data, micro: Micro):
    """The micro-step's gradient (per parameter, None when frozen) and loss, in fp64, then the loop's clipping."""
    x, y = data
    for name, p in ref.model.named_parameters():
        p.requires_grad_(name not in micro.frozen)
    ref.model.zero_grad(set_to_none=True)
    loss = sum(w * loss_of(ref.model, x[idx].double(), y[idx].double()) for idx, w in micro.parts)
    loss.backward()
    loss = loss.item()
    grads = [None if p.grad is None else p.grad.clone() for p in ref.model.parameters()]
    ref.model.zero_grad(set_to_none=True)
    if micro.clip is not None and math.isfinite(loss):
        clip_([g for g in grads if g is not None], micro.clip)
    return grads, loss


def _weighted(grads, sizes):
    """The sample-weighted mean of per-micro-step gradients."""
    n = sum(sizes)
    out = []
    for per_param in zip(*grads):
        present = [(g, s) for g, s in zip(per_param, sizes) if g is not None]
        out.append(sum(g * s for g, s in present) / n if present else None)
    return out


def _flat(grads):
    return torch.cat([g.flatten() for g in grads if g is not None])


def _cosines(grads, sizes, epoch_end: bool):
    """The fp64 cosine of the two halves' mean gradients: the most nearly equal split; for a window the door cut
    at the epoch's end (planned for more micro-steps), every split (the plan is not the user's number)."""
    splits = range(1, len(sizes)) if epoch_end else [first_half(sizes)]
    out = []
    for h in splits:
        g1, g2 = _weighted(grads[:h], sizes[:h]), _weighted(grads[h:], sizes[h:])
        out.append(float(F.cosine_similarity(_flat(g1), _flat(g2), dim=0)))
    return out


def check_trace(trace: Trace, ref: Reference, data, factor: Callable[[dict, int, List[Micro]], float],
                clip=None, rtol=RTOL, atol=ATOL) -> None:
    """Replay ``trace`` on ``ref`` and check every record and every step's parameters.

    Args:
        data: the dataset's ``(x, y)`` tensors (the trace's indices point into them).
        factor: the LR schedule's factor of a step, from ``(record, applied steps before it, its micro-steps)``.
        clip: the door's clipping of the step's mean gradient, ``(max_norm, norm_type or "value")``.
    """
    pos, applied = 0, 0
    assert len(trace.snaps) == len(trace.history)
    for k, rec in enumerate(trace.history):
        where = f"step {k + 1}: {rec}"
        micros, n = [], 0
        while n < rec["batch_size"]:
            assert pos < len(trace.micro), f"{where}: more samples than the door was fed"
            micros.append(trace.micro[pos])
            n += trace.micro[pos].samples
            pos += 1
        sizes = [m.samples for m in micros]
        assert n == rec["batch_size"] and len(micros) == rec["accumulation"], f"{where}: micro-steps {sizes}"
        assert rec["micro_batch_size"] == sizes[0], where
        assert rec["step"] == k + 1 and rec["lr_scale"] == pytest.approx(ref.lr_scale(n), rel=1e-12), where
        grads, losses = zip(*(_micro_grad(ref, data, m) for m in micros))
        loss = sum(s * v for s, v in zip(sizes, losses)) / n
        finite = all(math.isfinite(v) for v in losses)
        assert rec["stepped"] is finite, where
        if not finite:
            assert rec["skipped"] == "non-finite-loss", where
        else:
            mean = _weighted(grads, sizes)
            assert rec["loss"] == pytest.approx(loss, rel=rtol), where
            assert rec["grad_norm"] == pytest.approx(total_norm([g for g in mean if g is not None]), rel=rtol), where
            if len(micros) == 1:
                assert rec["statistics"] == "none", where
            elif rec["statistics"] != "none" or not micros[-1].epoch_end:
                assert rec["statistics"] == "microsteps", where
                cosines = _cosines(grads, sizes, micros[-1].epoch_end)
                assert any(rec["cosine"] == pytest.approx(c, rel=1e-7, abs=1e-9) for c in cosines), \
                    f"{where}: cosine {rec['cosine']} not in {cosines}"
            ref.apply(mean, n, clip=clip, factor=factor(rec, applied, micros))
            applied += 1
        torch.testing.assert_close(trace.snaps[k], flat(ref.model), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{where}: {m}")
    assert pos == len(trace.micro), f"{len(trace.micro) - pos} micro-steps fed but never in a step"
