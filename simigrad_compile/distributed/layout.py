"""Who holds what in the split-group reduction: halves, shards, partner segments and sample weights.

Ranks ``[0, N//2)`` form group 1 (half A) and ``[N//2, N)`` group 2 (half B). A bucket of ``n`` elements is
padded to ``P``, a multiple of ``L = lcm(|A|, |B|)`` chunks, so that both halves can reduce-scatter it into equal
shards. Rank ``i`` of a half of size ``h`` owns chunks ``[i L/h, (i+1) L/h)``. Every (A rank, B rank) pair whose
chunk ranges overlap exchanges exactly the overlap (a *segment*), so both see the two group sums of it:

    N = 4:  A = {0, 1}, B = {2, 3}, L = 2:  segments (0,2): chunk 0, (1,3): chunk 1   (partner r <-> r + N/2)
    N = 3:  A = {0},    B = {1, 2}, L = 2:  segments (0,1): chunk 0, (0,2): chunk 1

The A side of a segment records its statistics (each element is counted once in the world-wide sum).
FSDP's reduce-scatter, where each rank keeps only its own shard of the mean, uses the same halves and segments
(:class:`OwnerPlan`).

Weights: rank ``r`` with ``n_r`` of the step's ``n`` samples scales its local gradient by ``w_r = 2 n_r / n``
before the reduction. The shard pair is then ``(alpha g1, beta g2)`` with ``alpha = 2 n_A / n``,
``beta = 2 n_B / n`` and ``g1``, ``g2`` the sample-weighted mean gradients of the halves, so the fused kernel's
``(a + b) / 2`` is ``sum_r n_r g_r / n``: plain DDP's mean when the counts are equal. The statistics are
unscaled by ``(alpha beta, alpha^2, beta^2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class Segment:
    a_rank: int
    b_rank: int
    lo: int
    """First chunk (inclusive) of the overlap."""
    hi: int


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    half_a: Tuple[int, ...]
    half_b: Tuple[int, ...]
    chunks: int
    segments: Tuple[Segment, ...]
    """Every segment of the world, in one fixed order (the order process groups are created in)."""

    @property
    def in_a(self) -> bool:
        return self.rank < len(self.half_a)

    @property
    def half(self) -> Tuple[int, ...]:
        return self.half_a if self.in_a else self.half_b

    @property
    def index_in_half(self) -> int:
        return self.half.index(self.rank)

    @property
    def own_chunks(self) -> Tuple[int, int]:
        per = self.chunks // len(self.half)
        i = self.index_in_half
        return i * per, (i + 1) * per

    @property
    def my_segments(self) -> Tuple[Segment, ...]:
        return tuple(s for s in self.segments if self.rank in (s.a_rank, s.b_rank))

    def padded(self, numel: int) -> int:
        return -(-numel // self.chunks) * self.chunks

    def bytes_sent(self, padded_bytes: float) -> float:
        """Ring bytes this rank sends for a padded bucket: RS and AG in the half, plus its own shard."""
        h = len(self.half)
        return padded_bytes * (2 * (h - 1) + 1) / h


def _ranges(size: int, chunks: int, first: int) -> list:
    per = chunks // size
    return [(first + i, i * per, (i + 1) * per) for i in range(size)]


def make_layout(world: int, rank: int) -> Layout:
    if world < 2:
        raise ValueError(f"the split-group reduction needs at least 2 ranks, got world size {world}")
    half_a = tuple(range(world // 2))
    half_b = tuple(range(world // 2, world))
    chunks = math.lcm(len(half_a), len(half_b))
    segments = []
    for a, alo, ahi in _ranges(len(half_a), chunks, 0):
        for b, blo, bhi in _ranges(len(half_b), chunks, len(half_a)):
            lo, hi = max(alo, blo), min(ahi, bhi)
            if lo < hi:
                segments.append(Segment(a, b, lo, hi))
    return Layout(world, rank, half_a, half_b, chunks, tuple(segments))


@dataclass(frozen=True)
class Weights:
    own: float
    """``w_r``: the factor this rank's local gradient enters with."""
    alpha: float
    beta: float

    @property
    def stats_scale(self) -> Tuple[float, float, float]:
        """Divide the shard pair's ``(d, a, b)`` by these to get those of ``(g1, g2)``; NaN for an empty half."""
        a, b = self.alpha, self.beta
        if a == 0.0 or b == 0.0:
            return (math.nan, math.nan, math.nan)
        return (a * b, a * a, b * b)


def make_weights(layout: Layout, counts: Optional[Sequence[int]]) -> Weights:
    if counts is None:
        counts = [1] * layout.world
    n = sum(counts)
    n_a = sum(counts[r] for r in layout.half_a)
    return Weights(own=2.0 * counts[layout.rank] / n, alpha=2.0 * n_a / n, beta=2.0 * (n - n_a) / n)


def check_counts(counts: Sequence[int], world: int) -> Tuple[int, ...]:
    counts = tuple(counts)
    if len(counts) != world or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"sample counts must be {world} non-negative ints (one per rank), got {counts!r}")
    if sum(counts) == 0:
        raise ValueError("sample counts sum to 0: no rank has samples")
    return counts


@dataclass(frozen=True)
class Transfer:
    """One (A rank, B rank) segment of the FSDP owner exchange, seen from this rank."""

    peer: int
    segment: Segment
    send: Tuple[int, int]
    """Element range of this rank's piece (its half's sums of the other half's shards) that the peer owns."""
    recv: Tuple[int, int]
    """Element range of this rank's own shard that the peer sends (the other half's sum)."""


@dataclass(frozen=True)
class OwnerPlan:
    """FSDP's reduce-scatter as the split reduction: rank ``r`` ends with the mean of its own shard ``s_r``.

    Each shard is padded to ``shard`` elements (a multiple of ``lcm(L/|A|, L/|B|)``). The shards owned by a half
    form that half's *region*; both regions are cut into the layout's ``L`` chunks. In a region, the owners hold
    the chunks of their own half's ranges and the *senders* (the other half) those of theirs, so a segment
    ``(a, b, lo, hi)`` is, in A's region, what ``b`` sends to ``a``, and in B's region what ``a`` sends to ``b``.
    A rank's half reduce-scatters rows ``[own shard | piece]``, where ``piece`` (``o * shard / h`` elements) is
    its sender range of the other region; then each rank sends every part of its piece to its owner::

        N = 3: A = {0}, B = {1, 2}: rank 0 reduces nothing, sends s_1 to 1 and s_2 to 2 (A's sums);
               rank 1 reduces [s_1 | first half of s_0] over B and sends that half to 0, rank 2 the second.

    Every rank sends ``(N - 1) * shard`` elements, a ring reduce-scatter's (:attr:`sent`).
    """

    shard: int
    piece: int
    half: int
    transfers: Tuple[Transfer, ...]

    @property
    def sent(self) -> int:
        """Elements this rank sends: the ring reduce-scatter inside its half, then its piece."""
        return (self.half - 1) * (self.shard + self.piece) + self.piece


def owner_plan(layout: Layout, shard_numel: int) -> OwnerPlan:
    a, b, L = len(layout.half_a), len(layout.half_b), layout.chunks
    multiple = math.lcm(L // a, L // b)
    shard = -(-shard_numel // multiple) * multiple
    h = len(layout.half)
    o = layout.world - h
    own_chunk, send_chunk = h * shard // L, o * shard // L
    first = layout.own_chunks[0]
    transfers = tuple(
        Transfer(
            peer=s.b_rank if layout.in_a else s.a_rank,
            segment=s,
            send=((s.lo - first) * send_chunk, (s.hi - first) * send_chunk),
            recv=((s.lo - first) * own_chunk, (s.hi - first) * own_chunk),
        )
        for s in layout.my_segments
    )
    return OwnerPlan(shard=shard, piece=o * shard // h, half=h, transfers=transfers)
