"""The DDP communication hook: per bucket, reduce-scatter in the half, exchange with the partner, fused
statistics + mean on the shard pair, all-gather in the half; one all-reduce of the ``[buckets, 3]`` statistics
per step.

Each stage runs in its own thread (:class:`~.distributed_collectives.Serial`), which takes the buckets in order
and owns its process groups. So every group issues its collectives in bucket order on every rank (which gloo and
NCCL require), and the stages pipeline: while bucket k is in the kernel, bucket k+1 is exchanged and bucket
k+2 reduce-scattered, and the backward keeps producing gradients on the main thread::

    hook(k) -> [reduce-scatter](k) -> [exchange](k) -> [kernel](k) -> [all-gather](k) -> DDP's future(k)
                                                                              ... last bucket -> [fold]
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.futures import Future

from .collectives import Serial, all_gather, reduce_scatter, swap
from .layout import Layout, Weights, check_counts, make_weights
from ..stats.gradient_stats import Sink

log = logging.getLogger("simigrad_compile")

_KERNEL: Optional[Callable] = None
STAGES = ("reduce_scatter", "exchange", "kernel", "all_gather")


def _shard_stats_mean() -> Callable:
    global _KERNEL
    if _KERNEL is None:
        from ..kernels import shard_stats_mean  # imported on first use

        _KERNEL = shard_stats_mean
    return _KERNEL


def _then(fut: Future, fn: Callable, result: Future) -> None:
    """Run ``fn(fut.value())`` when ``fut`` completes; any error fails ``result`` (which DDP waits on)."""

    def run(done: Future) -> None:
        try:
            fn(done.value())
        except BaseException as e:  # noqa: BLE001 - handed to the future DDP waits on
            if not result.done():
                result.set_exception(e)

    fut.add_done_callback(run)


class _Step:
    def __init__(self) -> None:
        self.results: Dict[int, Future] = {}
        self.rows: Dict[int, torch.Tensor] = {}
        self.params: Dict[int, Tuple[torch.nn.Parameter, ...]] = {}
        self.buckets: Dict[int, Tuple[int, torch.dtype]] = {}
        self.trace: List[Tuple[float, int, str]] = []


class _Bucket:
    """One bucket's buffers on its way through the stages."""

    def __init__(self, index: int, buf: torch.Tensor, full: torch.Tensor, shard: torch.Tensor) -> None:
        self.index, self.buf, self.full, self.shard = index, buf, full, shard
        self.others: List[torch.Tensor] = []


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
        self._step = _Step()
        self._stages = {name: Serial(f"simigrad-ddp-{name}") for name in STAGES}
        self._buffers: Dict[tuple, torch.Tensor] = {}
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
            self._step = _Step()
        step = self._step
        self._mark(index, "hook")
        step.params[index] = tuple(bucket.parameters())
        buf = bucket.buffer()
        step.buckets[index] = (buf.numel(), buf.dtype)
        full = self._scaled(index, buf)
        h = len(self.layout.half)
        job = _Bucket(index, buf, full, self._buffer(index, "shard", full.numel() // h, full) if h > 1 else full)
        result: Future = Future()
        step.results[index] = result
        stages = [("exchange", self._exchange), ("kernel", self._kernel)]
        if h > 1:
            stages = [("reduce_scatter", self._reduce_scatter), *stages, ("all_gather", self._all_gather)]
        elif full is not buf:
            stages.append(("kernel", self._all_gather))
        if bucket.is_last():
            stages.append((stages[-1][0], self._fold))
        self._chain(job, stages, result)
        return result

    def _chain(self, job: _Bucket, stages, result: Future) -> None:
        if not stages:
            result.set_result(job.buf)
            return
        (name, fn), rest = stages[0], stages[1:]
        fut = self._stages[name].submit(lambda: fn(job))
        _then(fut, lambda _: self._chain(job, rest, result), result)

    def _mark(self, index: int, event: str) -> None:
        if self.tracing:
            self._step.trace.append((time.perf_counter(), index, event))

    def _buffer(self, index: int, role: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A scratch buffer reused across steps (fresh large CPU allocations page-fault on every step)."""
        key = (index, role)
        old = self._buffers.get(key)
        if old is None or old.numel() != numel or old.dtype != like.dtype or old.device != like.device:
            old = self._buffers[key] = like.new_empty(numel)
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

    # --- stages (each in its own thread, buckets in order) ------------------------------------------------
    def _reduce_scatter(self, job: _Bucket) -> None:
        reduce_scatter(job.shard, job.full, self.rs_group)
        self._mark(job.index, "reduce_scatter")

    def _parts(self, job: _Bucket):
        per = job.full.numel() // self.layout.chunks
        own_lo = self.layout.own_chunks[0]
        for seg, group in self.pair_groups.items():
            yield seg, group, job.shard[(seg.lo - own_lo) * per : (seg.hi - own_lo) * per]

    def _exchange(self, job: _Bucket) -> None:
        for k, (seg, group, part) in enumerate(self._parts(job)):
            other = self._buffer(job.index, f"other{k}", part.numel(), part)
            peer = seg.b_rank if self.layout.rank == seg.a_rank else seg.a_rank
            swap(part, other, peer, group)
            job.others.append(other)
        self._mark(job.index, "exchange")

    def _kernel(self, job: _Bucket) -> None:
        self._mark(job.index, "kernel_start")
        parts = [part for _, _, part in self._parts(job)]
        counted = [self.layout.rank == seg.a_rank for seg, _, _ in self._parts(job)]
        kernel = self.kernel or _shard_stats_mean()
        self._step.rows[job.index] = bucket_row(kernel, parts, job.others, counted, job.shard.device)
        job.others = []
        self._mark(job.index, "kernel")

    def _all_gather(self, job: _Bucket) -> None:
        if job.shard is not job.full:
            all_gather(job.full, job.shard, self.ag_group)
        if job.full is not job.buf:
            job.buf.copy_(job.full[: job.buf.numel()])
        self._mark(job.index, "all_gather")

    def _fold(self, job: _Bucket) -> None:
        """One all-reduce of every bucket's statistics, after the step's last bucket is reduced."""
        step = self._step
        rows = torch.stack([step.rows[i] for i in range(job.index + 1)])
        dist.all_reduce(rows, group=self.stats_group)
        self._sink_for(step).add(unscale(rows, self.weights.stats_scale))
        self._mark(job.index, "fold")
        self.last_trace = step.trace
        self.last_buckets = [step.buckets[i] for i in range(job.index + 1)]

    def _sink_for(self, step: _Step) -> Sink:
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
