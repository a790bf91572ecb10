"""Triton kernels and launchers of the three statistics ops (CUDA; CPU only under ``TRITON_INTERPRET=1``).

One launch covers a whole list of tensors. Each tensor is addressed as ``base + offset`` where ``base`` is the
first tensor of its role (x, y or out) and ``offset`` its element distance from that base, kept in an int64 table.
The work is cut into tiles of ``BLOCK`` elements; a tile table gives each program its tensor and start. Stage 1
writes per-tile partial sums, stage 2 adds each tensor's partials in a fixed order: deterministic, no atomics.
Tensors of different dtypes go to separate launches (one per dtype combination).

The launch path never waits for the device: the tables are cached per tensor-list signature (:class:`_TableCache`)
and a new one is copied asynchronously from pinned memory, so the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import collections
import logging
import os
import threading

import torch
import triton
import triton.language as tl
from torch import Tensor

from .torch_stats import check_pairs, flat, mean_out

log = logging.getLogger("simigrad_compile")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tensor table columns: x offset, y offset, out offset, numel, first tile, tile count, stats row.


@triton.jit
def _load_tile(x_base, y_base, tensors, tiles, BLOCK: tl.constexpr):
    """This program's tile: its index, its tensor's table row, element indices and mask, and x, y in fp32."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tiles + 2 * pid)
    start = tl.load(tiles + 2 * pid + 1)
    meta = tensors + t * 7
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < tl.load(meta + 3)
    x = tl.load(x_base + tl.load(meta + 0) + idx, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_base + tl.load(meta + 1) + idx, mask=mask, other=0.0).to(tl.float32)
    return pid, meta, idx, mask, x, y


@triton.jit
def _sum_stats_kernel(x_base, y_base, o_base, tensors, tiles, partials, scale, BLOCK: tl.constexpr):
    """One tile of tensor t: ``o = (x + y) * scale`` (in fp32, stored in o's dtype) and partial sums
    ``(sum x*y, sum x*x, sum y*y)`` in fp32 into ``partials[tile]``."""
    pid, meta, idx, mask, x, y = _load_tile(x_base, y_base, tensors, tiles, BLOCK)
    o_ptr = o_base + tl.load(meta + 2) + idx
    tl.store(o_ptr, ((x + y) * scale).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(partials + 3 * pid + 0, tl.sum(x * y, axis=0))
    tl.store(partials + 3 * pid + 1, tl.sum(x * x, axis=0))
    tl.store(partials + 3 * pid + 2, tl.sum(y * y, axis=0))


@triton.jit
def _pair_stats_kernel(x_base, y_base, tensors, tiles, partials, alpha, beta, BLOCK: tl.constexpr):
    """One tile of tensor t: ``other = alpha*y + beta*x`` per element in fp32, partial sums
    ``(sum x*other, sum x*x, sum other*other)`` into ``partials[tile]``. Nothing else is written."""
    pid, meta, idx, mask, x, y = _load_tile(x_base, y_base, tensors, tiles, BLOCK)
    other = alpha * y + beta * x
    tl.store(partials + 3 * pid + 0, tl.sum(x * other, axis=0))
    tl.store(partials + 3 * pid + 1, tl.sum(x * x, axis=0))
    tl.store(partials + 3 * pid + 2, tl.sum(other * other, axis=0))


@triton.jit
def _segment_sum_kernel(partials, tensors, stats, BLOCK: tl.constexpr):
    """Stage 2, one program per tensor t: ``stats[row_t, c] = sum over t's tiles k (in order) of partials[k, c]``."""
    t = tl.program_id(0).to(tl.int64)
    meta = tensors + t * 7
    first = tl.load(meta + 4)
    count = tl.load(meta + 5)
    row = tl.load(meta + 6)
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, count, BLOCK):
        k = s + tl.arange(0, BLOCK).to(tl.int64)
        mask = k < count
        p = partials + 3 * (first + k)
        acc_d += tl.load(p + 0, mask=mask, other=0.0)
        acc_a += tl.load(p + 1, mask=mask, other=0.0)
        acc_b += tl.load(p + 2, mask=mask, other=0.0)
    tl.store(stats + 3 * row + 0, tl.sum(acc_d, axis=0))
    tl.store(stats + 3 * row + 1, tl.sum(acc_a, axis=0))
    tl.store(stats + 3 * row + 2, tl.sum(acc_b, axis=0))


def _block() -> tuple[int, int]:
    """(BLOCK, num_warps). The interpreter pays per program, so it gets larger tiles."""
    return (16384, 1) if INTERPRET else (4096, 8)


def _check_device(op: str, ts: list[Tensor]) -> None:
    dev = ts[0].device
    if not (dev.type == "cuda" or (dev.type == "cpu" and INTERPRET)):
        raise ValueError(f"{op}: Triton path needs CUDA tensors (or cpu with TRITON_INTERPRET=1); got {dev}")


def _offsets(ts: list[Tensor]) -> list[int]:
    base = ts[0]
    return [(t.data_ptr() - base.data_ptr()) // t.element_size() for t in ts]


class _TableCache:
    """Device-resident tensor and tile tables, built once per tensor-list signature: the data pointers and lengths
    of every role, the stats rows and the tile size.

    A miss builds both tables on the host (pinned memory on CUDA) and copies them with ``non_blocking=True``: no
    host synchronisation, and the copy is capturable in a CUDA graph. A hit (the steady state: a CUDA graph
    replays with fixed addresses, and the caching allocator usually hands a training step the same addresses as
    the step before) launches straight away. Entries used while a CUDA graph is being captured are kept for the
    life of the process, since the graph reads them at every replay; other entries are evicted least recently
    used first, beyond :attr:`limit`.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.builds = 0
        self._lru: collections.OrderedDict = collections.OrderedDict()
        self._kept: dict = {}
        self._lock = threading.Lock()

    def get(self, roles: list[list[Tensor]], rows: list[int], block: int, device: torch.device):
        key = (device, block, tuple(rows), tuple(tuple((t.data_ptr(), t.numel()) for t in r) for r in roles))
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        with self._lock:
            entry = self._kept.get(key) or self._lru.get(key)
            if entry is None:
                entry = _build_tables(roles, rows, block, device)
                self.builds += 1
            if capturing:
                self._kept[key] = entry
                self._lru.pop(key, None)
            elif key not in self._kept:
                self._lru[key] = entry
                self._lru.move_to_end(key)
                while len(self._lru) > self.limit:
                    self._lru.popitem(last=False)
        return entry[0], entry[1]

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._kept.clear()


def _build_tables(roles: list[list[Tensor]], rows: list[int], block: int, device: torch.device) -> tuple:
    """The tensor table ``[T, 7]`` and the tile table ``[tiles, 2]`` (tensor, start) on ``device``, plus the host
    buffer they were copied from (kept with them: an asynchronous copy reads it later)."""
    numels = [t.numel() for t in roles[0]]
    counts = [-(-n // block) for n in numels]
    offsets = [_offsets(r) for r in roles] + [[0] * len(numels)] * (3 - len(roles))
    firsts, total = [], 0
    for c in counts:
        firsts.append(total)
        total += c
    flat_table = [v for row in zip(*offsets, numels, firsts, counts, rows) for v in row]
    tiles = [v for t, (first, count) in enumerate(zip(firsts, counts)) for k in range(count) for v in (t, k * block)]
    pinned = device.type == "cuda"
    host = torch.tensor(flat_table + tiles, dtype=torch.int64, pin_memory=pinned)
    packed = host.to(device, non_blocking=True) if pinned else host.to(device)
    return packed[: len(flat_table)], packed[len(flat_table) :], host


TABLES = _TableCache()


def _groups(dtypes: list[tuple]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(dtypes):
        groups.setdefault(key, []).append(i)
    return groups


def _launch(kernel, roles: list[list[Tensor]], rows: list[int], stats: Tensor, *scalars) -> None:
    block, num_warps = _block()
    tensors, tiles = TABLES.get(roles, rows, block, stats.device)
    n_tiles = tiles.numel() // 2
    partials = torch.empty(n_tiles, 3, dtype=torch.float32, device=stats.device)
    if n_tiles:
        kernel[(n_tiles,)](*(r[0] for r in roles), tensors, tiles, partials, *scalars, BLOCK=block, num_warps=num_warps)
    _segment_sum_kernel[(len(rows),)](partials, tensors, stats, BLOCK=1024, num_warps=4)
    log.debug("%s: %d tensors, %d tiles of %d", kernel.fn.__name__, len(rows), n_tiles, block)


def split_stats_sum(g1: list[Tensor], g2: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """``g[i] = g1[i] + g2[i]``; stats rows ``(g1.g2, |g1|^2, |g2|^2)`` fp32. One launch per dtype."""
    check_pairs("split_stats_sum", g1, g2)
    if not g1:
        return [], torch.zeros(0, 3, dtype=torch.float32)
    _check_device("split_stats_sum", g1)
    xs, ys = [flat(x) for x in g1], [flat(y) for y in g2]
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in g1]
    stats = torch.empty(len(g1), 3, dtype=torch.float32, device=g1[0].device)
    for idx in _groups([x.dtype for x in xs]).values():
        roles = [[xs[i] for i in idx], [ys[i] for i in idx], [out[i].view(-1) for i in idx]]
        _launch(_sum_stats_kernel, roles, idx, stats, 1.0)
    return out, stats


def pair_stats(own: list[Tensor], total: list[Tensor], alpha: float, beta: float) -> Tensor:
    """Stats rows ``(own.other, |own|^2, |other|^2)``, ``other = alpha*total + beta*own`` per element in fp32."""
    check_pairs("pair_stats", own, total, same_dtype=False)
    if not own:
        return torch.zeros(0, 3, dtype=torch.float32)
    _check_device("pair_stats", own)
    xs, ys = [flat(x) for x in own], [flat(t) for t in total]
    stats = torch.empty(len(own), 3, dtype=torch.float32, device=own[0].device)
    for idx in _groups([(x.dtype, y.dtype) for x, y in zip(xs, ys)]).values():
        roles = [[xs[i] for i in idx], [ys[i] for i in idx]]
        _launch(_pair_stats_kernel, roles, idx, stats, float(alpha), float(beta))
    return stats


def shard_stats_mean(a: Tensor, b: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``mean = (a + b)/2`` in ``a``'s dtype (into ``out``, which may be ``a``); stats ``[[a.b, |a|^2, |b|^2]]``."""
    check_pairs("shard_stats_mean", [a], [b])
    _check_device("shard_stats_mean", [a])
    out = mean_out(a, out)
    stats = torch.empty(1, 3, dtype=torch.float32, device=a.device)
    _launch(_sum_stats_kernel, [[flat(a)], [flat(b)], [out.view(-1)]], [0], stats, 0.5)
    return out, stats
