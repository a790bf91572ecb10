"""The three statistics ops built from torch ops (never the Triton interpreter); device-agnostic.

On CPU this path serves tensors of at most ``inductor_stats.SMALL`` elements, and any op and dtype that Inductor
could not compile (logged and counted by ``inductor_stats``); on CUDA, a machine without triton.

Each flat tensor pair is walked in chunks of ``CHUNK`` elements. The three fp32 dot products of a chunk are taken
and then its elementwise result is written, while the chunk is still in L2, so memory is streamed about once.
Per-chunk partial sums are added in a fixed order (fp64), so results are deterministic for a given thread count.
This module also holds the argument checks that every path of the ops shares.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK = 1 << 17
"""Elements per chunk with one intra-op thread: three fp32 chunks (two inputs, one result) stay within a core's
2 MiB L2."""

CHUNK_THREADED = 1 << 23
"""Elements per chunk with several intra-op threads. Every op on a chunk opens an OpenMP parallel region, and
on a loaded machine each region can wait a scheduler slice for a descheduled thread (measured here: 128K-element
chunks made a 16M-element call 140x slower than one add under a load average of 3). Large chunks keep the
regions few; they only bound the fp32 scratch of bf16/fp16 inputs."""


def chunk_size() -> int:
    return CHUNK if torch.get_num_threads() == 1 else CHUNK_THREADED

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_pairs(op: str, xs: list[Tensor], ys: list[Tensor], same_dtype: bool = True) -> None:
    """Raise ValueError unless ``xs[i]`` and ``ys[i]`` match in shape and device (and dtype if asked)."""
    if len(xs) != len(ys):
        raise ValueError(f"{op}: lists differ in length ({len(xs)} vs {len(ys)})")
    for i, (x, y) in enumerate(zip(xs, ys)):
        for t in (x, y):
            if t.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{op}: tensor pair {i} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
        if x.shape != y.shape:
            raise ValueError(f"{op}: tensor pair {i} differs in shape ({tuple(x.shape)} vs {tuple(y.shape)})")
        if x.device != y.device or x.device != xs[0].device:
            raise ValueError(f"{op}: tensor pair {i} is on {x.device} and {y.device}; all must share one device")
        if same_dtype and x.dtype != y.dtype:
            raise ValueError(f"{op}: tensor pair {i} differs in dtype ({x.dtype} vs {y.dtype})")


def flat(t: Tensor) -> Tensor:
    """A 1-D view of ``t``; copies only when ``t`` is not contiguous."""
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _as_fp32(chunk: Tensor, scratch: Tensor) -> Tensor:
    if chunk.dtype == torch.float32:
        return chunk
    return scratch[: chunk.numel()].copy_(chunk)


class _Scratch:
    """fp32 buffers of one chunk, allocated once per call."""

    def __init__(self, numel: int, count: int, device: torch.device) -> None:
        size = min(chunk_size(), numel)
        self.bufs = [torch.empty(size, dtype=torch.float32, device=device) for _ in range(count)]


def _sum_stats_into(x: Tensor, y: Tensor, o: Tensor, scale: float, row: Tensor, scratch: _Scratch) -> None:
    """``o = (x + y) * scale``; ``row = (x.y, |x|^2, |y|^2)``. Flat inputs; ``o`` may alias ``x``."""
    n, chunk = x.numel(), chunk_size()
    parts = torch.zeros(math.ceil(n / chunk), 3, dtype=torch.float32, device=x.device)
    for i, start in enumerate(range(0, n, chunk)):
        xc, yc, oc = x[start : start + chunk], y[start : start + chunk], o[start : start + chunk]
        xf, yf = _as_fp32(xc, scratch.bufs[0]), _as_fp32(yc, scratch.bufs[1])
        p = parts[i]
        torch.dot(xf, yf, out=p[0])
        torch.dot(xf, xf, out=p[1])
        torch.dot(yf, yf, out=p[2])
        torch.add(xc, yc, out=oc)  # after the dots: oc may be xc
        if scale != 1.0:
            oc.mul_(scale)
    row.copy_(parts.sum(0, dtype=torch.float64))


def _pair_stats_into(x: Tensor, t: Tensor, alpha: float, beta: float, row: Tensor, scratch: _Scratch) -> None:
    """``other = alpha*t + beta*x`` in fp32 per element; ``row = (x.other, |x|^2, |other|^2)``."""
    n, chunk = x.numel(), chunk_size()
    parts = torch.zeros(math.ceil(n / chunk), 3, dtype=torch.float32, device=x.device)
    for i, start in enumerate(range(0, n, chunk)):
        xf = _as_fp32(x[start : start + chunk], scratch.bufs[0])
        tf = _as_fp32(t[start : start + chunk], scratch.bufs[1])
        other = scratch.bufs[2][: xf.numel()]
        torch.mul(tf, alpha, out=other)
        other.add_(xf, alpha=beta)
        p = parts[i]
        torch.dot(xf, other, out=p[0])
        torch.dot(xf, xf, out=p[1])
        torch.dot(other, other, out=p[2])
    row.copy_(parts.sum(0, dtype=torch.float64))


def split_stats_sum(g1: list[Tensor], g2: list[Tensor], out: list[Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
    """``g[i] = g1[i] + g2[i]`` and stats rows ``(g1.g2, |g1|^2, |g2|^2)`` in fp32.

    ``out`` (optional) gives contiguous result tensors to write into, shaped and typed like ``g1``.
    """
    check_pairs("split_stats_sum", g1, g2)
    out = sum_outs(g1, out)
    device = g1[0].device if g1 else torch.device("cpu")
    stats = torch.empty(len(g1), 3, dtype=torch.float32, device=device)
    scratch = _Scratch(max((x.numel() for x in g1), default=0), 2, device)
    for i, (x, y, o) in enumerate(zip(g1, g2, out)):
        _sum_stats_into(flat(x), flat(y), o.view(-1), 1.0, stats[i], scratch)
    return out, stats


def pair_stats(own: list[Tensor], total: list[Tensor], alpha: float, beta: float) -> Tensor:
    """Stats rows ``(own.other, |own|^2, |other|^2)`` with ``other = alpha*total + beta*own`` per element."""
    check_pairs("pair_stats", own, total, same_dtype=False)
    device = own[0].device if own else torch.device("cpu")
    stats = torch.empty(len(own), 3, dtype=torch.float32, device=device)
    scratch = _Scratch(max((x.numel() for x in own), default=0), 3, device)
    for i, (x, t) in enumerate(zip(own, total)):
        _pair_stats_into(flat(x), flat(t), float(alpha), float(beta), stats[i], scratch)
    return stats


def sum_outs(g1: list[Tensor], out: list[Tensor] | None) -> list[Tensor]:
    """``split_stats_sum``'s outputs: new contiguous tensors like ``g1``, or ``out`` once checked."""
    if out is None:
        return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in g1]
    if len(out) != len(g1) or any(o.shape != x.shape or not o.is_contiguous() for o, x in zip(out, g1)):
        raise ValueError("split_stats_sum: out must hold one contiguous tensor shaped like each g1[i]")
    return out


def mean_out(a: Tensor, out: Tensor | None) -> Tensor:
    """``shard_stats_mean``'s output: a new contiguous tensor like ``a``, or ``out`` once checked."""
    if out is None:
        return torch.empty_like(a, memory_format=torch.contiguous_format)
    if out.shape != a.shape or out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError("shard_stats_mean: out must be contiguous and match a in shape and dtype")
    return out


def shard_stats_mean(a: Tensor, b: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``mean = (a + b)/2`` in ``a``'s dtype (into ``out``, which may be ``a``); stats ``[[a.b, |a|^2, |b|^2]]``."""
    check_pairs("shard_stats_mean", [a], [b])
    out = mean_out(a, out)
    stats = torch.empty(1, 3, dtype=torch.float32, device=a.device)
    _sum_stats_into(flat(a), flat(b), out.view(-1), 0.5, stats[0], _Scratch(a.numel(), 2, a.device))
    return out, stats
