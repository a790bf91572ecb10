"""The DDP communication hook: per bucket, reduce-scatter in the half, exchange with the partner, fused
statistics + mean on the shard pair, all-gather in the half; the ``[buckets, 3]`` statistics summed once per
step (:meth:`SplitReduction._start_fold`).

One worker thread (:class:`~.collectives.Serial`) runs every bucket's stages, bucket after bucket, so every
group issues its collectives in bucket order on every rank (which gloo and NCCL require). Where the rank's half
has one rank (world 2, and half A of world 3) the hook itself posts the exchange, elsewhere the reduce-scatter's
first ring step, so the bytes start to move in gloo's threads while the backward goes on; the worker waits on
them with the GIL released::

    hook(k): scale, post exchange(k) | the reduce-scatter's first step(k)
      -> worker: [rest of the reduce-scatter(k), post exchange(k)], wait, kernel(k), [all-gather(k)]
      -> DDP's future(k)             ... last bucket: the fold's all-reduce runs during its all-gather

Fewer threads is faster here: a stage per thread (the first design) put four thread hand-offs on each bucket's
path, each a wake-up that waits for a core on a loaded machine (``bench/bench_ddp_profile.py``).

At an even world both partners hold the same two shard sums after the exchange and run the kernel on them in the
same operand order (A's first), so both record the same bits: the statistics need summing inside a half only
(nothing at world 2, one swap of the rows at world 4), not an all-reduce over the world.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.futures import Future

from .collectives import FOLD_TAG, Serial, all_gather, post_swap, start_reduce_scatter, wait_all
from .layout import Layout, Weights, check_counts, make_weights
from ..stats.gradient_stats import Sink

log = logging.getLogger("simigrad_compile")

_KERNEL: Optional[Callable] = None


def _shard_stats_mean() -> Callable:
    global _KERNEL
    if _KERNEL is None:
        from ..kernels import shard_stats_mean  # imported on first use

        _KERNEL = shard_stats_mean
    return _KERNEL


class _StepRows:
    """One optimizer step's statistics rows, per bucket: what the fold at the step's end sums."""

    def __init__(self) -> None:
        self.rows: Dict[int, torch.Tensor] = {}
        self.params: Dict[int, Tuple[torch.nn.Parameter, ...]] = {}
        self.buckets: Dict[int, Tuple[int, torch.dtype]] = {}
        self.trace: List[Tuple[float, int, str]] = []


class _Bucket:
    """One bucket's buffers on its way through the stages."""

    def __init__(self, index: int, buf: torch.Tensor, full: torch.Tensor, shard: torch.Tensor) -> None:
        self.index, self.buf, self.full, self.shard = index, buf, full, shard
        self.others: List[torch.Tensor] = []
        self.works: Optional[list] = None
        """The exchange's pending sends and receives, once posted."""
        self.reduce_scatter: Optional[Callable[[], None]] = None
        """The rest of the reduce-scatter whose first step the hook posted."""


class SplitReduction:
    """The comm hook's state: process groups, the sample weights and the statistics sink of one DDP model."""

    def __init__(self, module: torch.nn.Module, layout: Layout) -> None:
        self.module = module
        self.layout = layout
        self.counts: Optional[Tuple[int, ...]] = None
        self.weights: Weights = make_weights(layout, None)
        self.tracing = False
        self.kernel: Optional[Callable] = None
        """Overrides ``kernels.shard_stats_mean`` (for diagnostics, e.g. a benchmark's communication-only run)."""
        self.last_trace: List[Tuple[float, int, str]] = []
        self.last_buckets: List[Tuple[int, torch.dtype]] = []
        """(numel, dtype) of each bucket of the last reduced step."""
        self._sinks: List[Sink] = []
        self._sink_key: Optional[tuple] = None
        self._step = _StepRows()
        self._worker = Serial("simigrad-ddp")
        self._scratch: Dict[tuple, torch.Tensor] = {}
        self._build_groups()

    def _build_groups(self) -> None:
        lay = self.layout
        # new_group is collective over the world: every rank creates every group, in the same order.
        rs = {h: dist.new_group(list(h)) for h in (lay.half_a, lay.half_b)}
        ag = {h: dist.new_group(list(h)) for h in (lay.half_a, lay.half_b)}
        pairs = {s: dist.new_group([s.a_rank, s.b_rank]) for s in lay.segments}
        self.rs_group, self.ag_group = rs[lay.half], ag[lay.half]
        self.pair_groups = {s: pairs[s] for s in lay.my_segments}
        self.stats_group = dist.new_group(list(range(lay.world)))

    # --- public -----------------------------------------------------------------------------------------
    def set_sample_counts(self, counts: Optional[Sequence[int]]) -> None:
        """Per-rank sample counts of the coming steps (the same list on every rank); ``None``: equal."""
        if counts is not None:
            counts = check_counts(counts, self.layout.world)
            empty = [r for r, c in enumerate(counts) if c == 0]
            if empty:
                log.warning("simigrad ddp: rank(s) %s have 0 samples: excluded from the reduction (weight 0)", empty)
            for name, half in (("group 1", self.layout.half_a), ("group 2", self.layout.half_b)):
                if all(counts[r] == 0 for r in half):
                    log.warning("simigrad ddp: %s (ranks %s) has no samples: statistics are NaN", name, list(half))
        self.counts = counts
        self.weights = make_weights(self.layout, counts)

    # --- the hook ---------------------------------------------------------------------------------------
    def __call__(self, bucket: dist.GradBucket) -> Future:
        index = bucket.index()
        if index == 0:
            self._step = _StepRows()
        step = self._step
        self._mark(index, "hook")
        step.params[index] = tuple(bucket.parameters())
        buf = bucket.buffer()
        step.buckets[index] = (buf.numel(), buf.dtype)
        full = self._scaled(index, buf)
        h = len(self.layout.half)
        job = _Bucket(index, buf, full, self._buffer(index, "shard", full.numel() // h, full) if h > 1 else full)
        if h == 1:
            self._post_exchange(job)  # nothing to reduce-scatter: the exchange starts now, in gloo's threads
        else:
            job.reduce_scatter = start_reduce_scatter(job.shard, job.full, self.rs_group)  # its first step
        last = bucket.is_last()
        return self._worker.submit(lambda: self._reduce(job, last))

    def _reduce(self, job: _Bucket, last: bool) -> torch.Tensor:
        """The bucket's stages after the hook, in the worker thread (every wait releases the GIL)."""
        if job.works is None:
            job.reduce_scatter()
            self._mark(job.index, "reduce_scatter")
            self._post_exchange(job)
        wait_all(job.works)
        self._mark(job.index, "exchange")
        result = self._kernel(job)
        fold = self._start_fold(job.index) if last else None  # its latency overlaps the all-gather's
        if job.shard is not job.full:
            all_gather(job.full, result, self.ag_group)
            result = job.full
        if job.full is not job.buf:
            job.buf.copy_(result[: job.buf.numel()])
            result = job.buf
        self._mark(job.index, "all_gather")
        if fold is not None:
            fold()
        return result

    def _mark(self, index: int, event: str) -> None:
        if self.tracing:
            self._step.trace.append((time.perf_counter(), index, event))

    def _buffer(self, index: int, role: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A scratch buffer reused across steps (fresh large CPU allocations page-fault on every step)."""
        key = (index, role)
        old = self._scratch.get(key)
        if old is None or old.numel() != numel or old.dtype != like.dtype or old.device != like.device:
            old = self._scratch[key] = like.new_empty(numel)
        return old

    def _scaled(self, index: int, buf: torch.Tensor) -> torch.Tensor:
        """``w_r * buf`` padded to the layout; the bucket buffer itself when no padding is needed."""
        w = self.weights.own
        padded = self.layout.padded(buf.numel())
        full = buf
        if padded != buf.numel():
            full = self._buffer(index, "padded", padded, buf)
            full[buf.numel() :].zero_()
        head = full[: buf.numel()]
        if w == 0.0:
            head.zero_()
        elif full is buf:
            if w != 1.0:
                buf.mul_(w)
        else:
            torch.mul(buf, w, out=head)
        return full

    # --- stages (the worker thread, buckets in order; the exchange may be posted by the hook) ---------------
    def _parts(self, job: _Bucket):
        per = job.full.numel() // self.layout.chunks
        own_lo = self.layout.own_chunks[0]
        for seg, group in self.pair_groups.items():
            yield seg, group, job.shard[(seg.lo - own_lo) * per : (seg.hi - own_lo) * per]

    def _post_exchange(self, job: _Bucket) -> None:
        job.works = []
        for k, (seg, group, part) in enumerate(self._parts(job)):
            other = self._buffer(job.index, f"other{k}", part.numel(), part)
            peer = seg.b_rank if self.layout.rank == seg.a_rank else seg.a_rank
            job.works += post_swap(part, other, peer, group)
            job.others.append(other)

    @property
    def paired(self) -> bool:
        """Even world: each rank shares its whole shard with one partner, which holds the same pair of sums."""
        return self.layout.world % 2 == 0

    def _kernel(self, job: _Bucket) -> torch.Tensor:
        """The mean of each exchanged segment, in place; returns the tensor that holds the shard's mean."""
        self._mark(job.index, "kernel_start")
        kernel = self.kernel or _shard_stats_mean()
        parts = [part for _, _, part in self._parts(job)]
        if self.paired:
            # Both partners run the kernel on (A's sum, B's sum) in that order, so they record the same bits;
            # on the B rank the mean lands in the received buffer.
            (part,), (other,) = parts, job.others
            a, b = (part, other) if self.layout.in_a else (other, part)
            _, stats = kernel(a, b, out=a)
            self._step.rows[job.index] = stats.reshape(3).to(torch.float32)
            result = a
        else:
            counted = [self.layout.rank == seg.a_rank for seg, _, _ in self._parts(job)]
            self._step.rows[job.index] = bucket_row(kernel, parts, job.others, counted, job.shard.device)
            result = job.shard
        job.others, job.works = [], None
        self._mark(job.index, "kernel")
        return result

    def _start_fold(self, last: int) -> Callable[[], None]:
        """The step's statistics, started after the step's last kernel; the returned function completes them and
        records the rows. Even world: partners hold the same rows, so the rows of one half sum to the world's:
        gathered inside the half (at world 4, one swap that runs alongside the last all-gather; none at world 2)
        and summed in half order, the same bits on every rank. Odd world: one all-reduce of the counted rows."""
        step = self._step
        rows = torch.stack([step.rows[i] for i in range(last + 1)])
        h = len(self.layout.half)
        finish_comm: Callable[[], torch.Tensor]
        if not self.paired:
            work = dist.all_reduce(rows, group=self.stats_group, async_op=True)
            finish_comm = lambda: (work.wait(), rows)[1]  # noqa: E731
        elif h == 1:
            finish_comm = lambda: rows  # noqa: E731
        elif h == 2 and dist.get_backend(self.ag_group) == "gloo":
            theirs = torch.empty_like(rows)
            peer = self.layout.half[1 - self.layout.index_in_half]
            works = post_swap(rows, theirs, peer, self.ag_group, tag=FOLD_TAG)
            mine_first = self.layout.index_in_half == 0
            finish_comm = lambda: (wait_all(works), (rows + theirs) if mine_first else (theirs + rows))[1]  # noqa: E731
        else:
            def finish_comm() -> torch.Tensor:
                every = rows.new_empty(h * rows.numel())
                all_gather(every, rows.reshape(-1), self.ag_group)
                return every.view(h, *rows.shape).sum(0)

        def finish() -> None:
            total = finish_comm()
            self._sink_for(step).add(unscale(total, self.weights.stats_scale))
            self._mark(last, "fold")
            self.last_trace = step.trace
            self.last_buckets = [step.buckets[i] for i in range(last + 1)]

        return finish

    def _sink_for(self, step: _StepRows) -> Sink:
        key = tuple(tuple(id(p) for p in step.params[i]) for i in range(len(step.params)))
        if key != self._sink_key:
            names = {id(p): n for n, p in self.module.named_parameters()}
            groups = [[(names[id(p)], p) for p in step.params[i]] for i in range(len(step.params))]
            self._sinks.append(Sink("ranks", groups))
            self._sink_key = key
            log.info("simigrad ddp: statistics sink with %d bucket(s)", len(groups))
        return self._sinks[-1]


def bucket_row(kernel: Callable, parts: Sequence[torch.Tensor], others: Sequence[torch.Tensor],
               counted: Sequence[bool], device: torch.device) -> torch.Tensor:
    """One bucket on this rank: ``part = (part + other) / 2`` in place for each exchanged segment, and the fp32
    ``(d, a, b)`` of the segments this rank counts (the A side of each pair, so every element counts once in
    the world-wide sum). Zeros when it counts none. On the bucket's ``device``: NCCL all-reduces device tensors."""
    rows = []
    for part, other, count in zip(parts, others, counted):
        _, stats = kernel(part, other, out=part)
        if count:
            rows.append(stats.reshape(3).to(torch.float32))
    if not rows:
        return torch.zeros(3, dtype=torch.float32, device=device)
    return torch.stack(rows).sum(0)


def unscale(rows: torch.Tensor, stats_scale: Sequence[float]) -> torch.Tensor:
    """The folded ``[buckets, 3]`` rows of the shard pairs -> those of ``(g1, g2)`` (divided on ``rows``' device)."""
    return rows / torch.tensor(stats_scale, dtype=rows.dtype, device=rows.device)


def ddp_hook(state: SplitReduction, bucket: dist.GradBucket) -> Future:
    return state(bucket)


# DDP checks the hook's annotations as objects (this module's are strings under `from __future__ import`).
ddp_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
