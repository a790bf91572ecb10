"""The DDP communication hook: per bucket, reduce-scatter in the half, exchange with the partner, fused
statistics + mean on the shard pair, all-gather in the half; one all-reduce of the ``[buckets, 3]`` statistics
per step.

Every stage is an asynchronous collective whose completion callback launches the next stage, so bucket k's
kernel runs (in a communication thread) while later buckets are still being produced and communicated. Callbacks
finish in any order on different ranks, while gloo (and NCCL) match collectives on a process group by issue
order; so each stage has its own process group and issues its collectives in bucket order (:class:`_InOrder`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.futures import Future

from .distributed_collectives import Serial, reduce_scatter
from .distributed_layout import Layout, Weights, check_counts, make_weights
from .statistics import Sink

log = logging.getLogger("simigrad_compile")

_KERNEL: Optional[Callable] = None


def _shard_stats_mean() -> Callable:
    global _KERNEL
    if _KERNEL is None:
        try:
            from .kernels import shard_stats_mean
        except ImportError as e:  # TEMPORARY until simigrad_compile.kernels lands
            log.warning("simigrad ddp: kernels.shard_stats_mean unavailable (%s): temporary torch fallback", e)
            shard_stats_mean = _fallback_shard_stats_mean
        _KERNEL = shard_stats_mean
    return _KERNEL


def _fallback_shard_stats_mean(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None):
    a32, b32 = a.float(), b.float()
    stats = torch.stack([a32 @ b32, a32 @ a32, b32 @ b32]).reshape(1, 3)
    mean = torch.add(a, b, out=out) if out is not None else a + b
    return mean.mul_(0.5), stats


class _InOrder:
    """Issues one process group's collectives in bucket order, whichever thread reaches its stage first."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._next = 0
        self._ready: Dict[int, Callable[[], None]] = {}

    def reset(self) -> None:
        with self._lock:
            if self._ready:
                raise RuntimeError(f"simigrad ddp: buckets {sorted(self._ready)} never issued their collective")
            self._next = 0

    def submit(self, index: int, launch: Callable[[], None]) -> None:
        with self._lock:
            self._ready[index] = launch
            while self._next in self._ready:
                self._ready.pop(self._next)()
                self._next += 1


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


class SplitReduction:
    """The comm hook's state: process groups, the sample weights and the statistics sink of one DDP model."""

    def __init__(self, module: torch.nn.Module, layout: Layout) -> None:
        self.module = module
        self.layout = layout
        self.counts: Optional[Tuple[int, ...]] = None
        self.weights: Weights = make_weights(layout, None)
        self.tracing = False
        self.last_trace: List[Tuple[float, int, str]] = []
        self.last_buckets: List[Tuple[int, torch.dtype]] = []
        """(numel, dtype) of each bucket of the last reduced step."""
        self._sinks: List[Sink] = []
        self._sink_key: Optional[tuple] = None
        self._step = _Step()
        self._rs_thread = Serial("simigrad-ddp-reduce-scatter")
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
        self._order = {name: _InOrder() for name in ("ag", *map(str, self.pair_groups))}

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
            self._start_step()
        step = self._step
        self._mark(index, "hook")
        step.params[index] = tuple(bucket.parameters())
        buf = bucket.buffer()
        step.buckets[index] = (buf.numel(), buf.dtype)
        full = self._scaled(buf)
        result: Future = Future()
        step.results[index] = result
        if len(self.layout.half) > 1:
            shard = full.new_empty(full.numel() // len(self.layout.half))
            fut = self._rs_thread.submit(lambda: reduce_scatter(shard, full, self.rs_group))
            _then(fut, lambda _: self._exchange(index, buf, full, shard, result), result)
        else:
            self._exchange(index, buf, full, full, result)
        if bucket.is_last():
            return self._fold(index, result)
        return result

    def _start_step(self) -> None:
        for order in self._order.values():
            order.reset()
        self._step = _Step()
        self._step.trace.append((time.perf_counter(), -1, "start"))

    def _mark(self, index: int, event: str) -> None:
        if self.tracing:
            self._step.trace.append((time.perf_counter(), index, event))

    def _scaled(self, buf: torch.Tensor) -> torch.Tensor:
        """``w_r * buf`` padded to the layout; the bucket buffer itself when no padding is needed."""
        w = self.weights.own
        padded = self.layout.padded(buf.numel())
        full = buf if padded == buf.numel() else buf.new_zeros(padded)
        head = full[: buf.numel()]
        if w == 0.0:
            head.zero_()
        elif full is buf:
            if w != 1.0:
                buf.mul_(w)
        else:
            torch.mul(buf, w, out=head)
        return full

    def _exchange(self, index: int, buf, full, shard, result: Future) -> None:
        self._mark(index, "rs")
        lay = self.layout
        per = full.numel() // lay.chunks
        own_lo = lay.own_chunks[0]
        parts, futs = [], []
        for seg, group in self.pair_groups.items():
            part = shard[(seg.lo - own_lo) * per : (seg.hi - own_lo) * per]
            both = part.new_empty(2 * part.numel())
            fut: Future = Future()
            parts.append((seg, part, both))
            futs.append(fut)

            def launch(part=part, both=both, group=group, fut=fut) -> None:
                work = dist.all_gather_single(both, part, group=group, async_op=True)
                _then(work.get_future(), fut.set_result, result)

            self._order[str(seg)].submit(index, launch)
        done = torch.futures.collect_all(futs)
        _then(done, lambda _: self._combine(index, buf, full, shard, parts, result), result)

    def _combine(self, index: int, buf, full, shard, parts, result: Future) -> None:
        self._mark(index, "exchange")
        kernel = _shard_stats_mean()
        rows = []
        for seg, part, both in parts:
            n = part.numel()
            _, stats = kernel(both[:n], both[n:], out=part)
            if self.layout.rank == seg.a_rank:
                rows.append(stats.reshape(3))
        self._step.rows[index] = torch.stack(rows).sum(0) if rows else torch.zeros(3, dtype=torch.float32)
        self._mark(index, "kernel")

        def finish(_=None) -> None:
            self._mark(index, "gather")
            if full is not buf:
                buf.copy_(full[: buf.numel()])
            result.set_result(buf)

        if len(self.layout.half) > 1:

            def launch() -> None:
                work = dist.all_gather_single(full, shard, group=self.ag_group, async_op=True)
                _then(work.get_future(), finish, result)

            self._order["ag"].submit(index, launch)
        else:
            finish()

    def _fold(self, last: int, last_result: Future) -> Future:
        """One all-reduce of every bucket's statistics, after the step's last bucket is reduced."""
        step, weights, out = self._step, self.weights, Future()

        def reduce(_) -> None:
            rows = torch.stack([step.rows[i] for i in range(last + 1)]).to(torch.float32)
            work = dist.all_reduce(rows, group=self.stats_group, async_op=True)
            _then(work.get_future(), lambda _: record(rows), out)

        def record(rows: torch.Tensor) -> None:
            rows /= torch.tensor(weights.stats_scale, dtype=torch.float32)
            self._sink_for(step).add(rows)
            self._mark(last, "fold")
            self.last_trace = step.trace
            self.last_buckets = [step.buckets[i] for i in range(last + 1)]
            out.set_result(last_result.value())

        _then(torch.futures.collect_all(list(step.results.values())), reduce, out)
        return out

    def _sink_for(self, step: _Step) -> Sink:
        key = tuple(tuple(id(p) for p in step.params[i]) for i in range(len(step.params)))
        if key != self._sink_key:
            names = {id(p): n for n, p in self.module.named_parameters()}
            groups = [[(names[id(p)], p) for p in step.params[i]] for i in range(len(step.params))]
            self._sinks.append(Sink("ranks", groups))
            self._sink_key = key
            log.info("simigrad ddp: statistics sink with %d bucket(s)", len(groups))
        return self._sinks[-1]


def ddp_hook(state: SplitReduction, bucket: dist.GradBucket) -> Future:
    return state(bucket)


# DDP checks the hook's annotations as objects (this module's are strings under `from __future__ import`).
ddp_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
