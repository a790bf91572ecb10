"""The adaptive loader: micro-batches of the current rung, every sample once per epoch.

Order. Each epoch has one permutation (``seed + epoch``, as ``DistributedSampler``); under ``torch.distributed``
it is padded to a multiple of the world size by repeating its head (or truncated with ``drop_last``) and rank
``r`` takes ``perm[r::world]``. A rank's order never depends on the batch size.

Epochs. A rank's samples form one stream: epoch 0's order, then epoch 1's, and so on; every micro-batch is the
next slice of the stream, of the current rung. Epoch ``e`` is the ``e``-th order of the stream, in which each of
the rank's samples appears exactly once. One pass of ``for batch in loader`` runs whole steps from ``run``'s
position until the stream reaches the end of the current epoch's order. Its last step (the tail) has only as many
of the plan's micro-batches of ``m`` samples as cover the ``r`` samples left (``Ladder.tail``: ``ceil(r/m)``, or
more where a plan needs more micro-steps: ``min_accumulation``, two samples), and its last micro-batch is
completed with the first samples of the next epoch's order (of the epochs after, for a dataset smaller than the
step); the next pass starts after them. With ``symbolic_batch=True`` (no CUDA graphs) one graph runs every size of
2 or more, so the tail is instead the ``r`` samples exactly, in as many near-equal micro-batches of at least 2
(``Ladder.tail_sizes``), and the epoch ends on its last sample; where ``r`` is too small for that, as above. So:

- a tail compiles nothing: its micro-batches are of the current rung, or of sizes the one symbolic graph runs;
- no step straddles two passes; a pass trains on at most ``m - 1`` samples of the next epoch, more only where
  the plan needs more micro-steps (up to ``min_accumulation * m - 1`` in group mode ``microsteps``; one sample
  at ``m = 1``), and the next pass skips them;
- a step's mean gradient is the plain mean over its samples (:mod:`simigrad_compile.runtime.window` weighs
  micro-batches of different sizes by their samples), whichever epoch they come from;
- ``run.epoch`` counts the orders finished and ``run.state_dict()`` holds the offset in the current one, so a
  resumed run continues the stream exactly.

With ``drop_last=True`` a pass instead stops before a step it cannot fill; those samples are skipped.

Loading. The loader is a ``torch.utils.data.DataLoader`` (with the user's ``num_workers``, ``pin_memory``,
``collate_fn``, ...) whose batch sampler hands out index lists of the predicted micro-batch sizes: the workers
fetch and collate whole micro-batches, as in a plain loop. The prediction is the current plan; each index list
carries its stream position and size, and each micro-batch that arrives is checked against what the step
needs. When the plan changed to another rung after the lists were handed out, the prefetched micro-batches
(at most ``prefetch_factor * num_workers``) are discarded, counted in ``discarded``, and their samples handed
out again in the new size. A change of the accumulation alone discards nothing. Lists prefetched past the end
of a pass are discarded (and counted) too; where the plan's tail turns out longer than predicted, the loader
starts a new ``DataLoader`` iterator for the rest.

Iterable datasets. An ``IterableDataset`` is streamed in the dataset's own order, one process only: samples
cross from the workers one at a time and are collated in the main process. An epoch is one pass over the
iterable; the tail is completed from the next pass over it, as above. Resuming reads and skips the samples
already trained on, so the iterable must yield the same order every pass. ``shuffle`` and data parallelism
are refused (ranks could run out at different steps).

Batch shapes. The batch dim of every tensor in a micro-batch is marked static (``torch._dynamo.mark_static``),
so Dynamo compiles one graph per rung instead of turning the batch dim dynamic; with ``symbolic_batch=True`` it
is marked dynamic (at least 2) instead, and one graph serves every micro-batch of 2 or more. A tensor copied
afterwards (for example ``x.cuda()``) loses the mark: pass ``device=`` to move it here first.
"""

from __future__ import annotations

import collections
import itertools
import logging
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
import torch.utils.data as tud

from .. import compat

log = logging.getLogger("simigrad_compile")


def rank_order(n: int, epoch: int, shuffle: bool, seed: int, world: int, rank: int, drop_last: bool) -> List[int]:
    """This rank's sample indices for ``epoch`` (``DistributedSampler``'s order and padding)."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
    else:
        perm = list(range(n))
    if drop_last:
        perm = perm[: n - n % world]
    elif n % world:
        pad = world - n % world
        perm += (perm * (pad // max(n, 1) + 1))[:pad]
    return perm[rank::world]


class _Pass:
    """What the batch sampler of one pass has handed out: the stream position of the next index list, the sizes
    left in the step it predicts, and ``(generation, start, size)`` of each list not yet arrived."""

    def __init__(self, epoch: int, cursor: int):
        self.epoch, self.cursor = epoch, cursor
        self.pending: List[int] = []
        self.generation = 0
        self.issued: collections.deque = collections.deque()

    def restart(self, cursor: int, sizes: Sequence[int]) -> None:
        """Hand out from ``cursor`` again; every list handed out before is stale."""
        self.generation += 1
        self.cursor, self.pending = cursor, list(sizes)


class _Orders:
    """Each epoch's order of this rank's samples (the last few cached), and slices of their concatenation."""

    def __init__(self, n: int, shuffle: bool, seed: int, world: int, rank: int, drop_last: bool):
        self.args = (shuffle, seed, world, rank, drop_last)
        self.n, self.cache = n, {}
        self.length = (n - n % world if drop_last else -(-n // world) * world) // world
        """Samples per epoch on this rank (``len(rank_order(...))``)."""

    def order(self, epoch: int) -> List[int]:
        order = self.cache.get(epoch)
        if order is None:
            if len(self.cache) > 2:
                self.cache.pop(min(self.cache))
            shuffle, seed, world, rank, drop_last = self.args
            order = self.cache[epoch] = rank_order(self.n, epoch, shuffle, seed, world, rank, drop_last)
        return order

    def slice(self, epoch: int, start: int, size: int) -> List[int]:
        """Positions ``[start, start + size)`` of the stream that starts with ``epoch``'s order."""
        if start + size <= self.length:
            return self.order(epoch)[start:start + size]
        out, end = [], start + size
        while start < end:
            e, i = divmod(start, self.length)
            part = self.order(epoch + e)[i:i + end - start]
            out += part
            start += len(part)
        return out


class _Issuer:
    """The ``DataLoader``'s batch sampler: index lists of the predicted micro-batch sizes from the current
    pass's cursor. It runs in the main process, ahead of the step by the DataLoader's prefetch."""

    def __init__(self, orders: _Orders, run, drop_last: bool):
        self.orders, self.run, self.drop_last = orders, run, drop_last
        self.current: Optional[_Pass] = None

    def __iter__(self) -> Iterator[List[int]]:
        p, run, orders = self.current, self.run, self.orders
        while True:
            if not p.pending:
                if p.cursor >= orders.length:
                    return
                p.pending = list(run.window_sizes(orders.length - p.cursor, self.drop_last))
                if not p.pending:
                    return
            size = p.pending.pop(0)
            start, p.cursor = p.cursor, p.cursor + size
            p.issued.append((p.generation, start, size))
            yield orders.slice(p.epoch, start, size)


def mark_batch(dim: int, device: Any, symbolic: bool = False) -> Callable[[Any], Any]:
    """A function that moves a tensor to ``device`` and marks its batch dim ``dim`` static, or with ``symbolic``
    dynamic where it holds 2 samples or more (a batch of 1 has no halves, and Dynamo specializes it anyway). The
    dynamic mark is Dynamo's weak one: a model whose code specializes the batch size compiles a graph for that
    size, and the backend names the input (:func:`simigrad_compile.compile.input_sizes.specialized`)."""

    def mark(t):
        if isinstance(t, torch.Tensor):
            if device is not None:
                t = t.to(device, non_blocking=True)
            if t.dim() > dim:
                if symbolic and t.shape[dim] >= 2:
                    compat.maybe_mark_dynamic(t, dim)
                else:
                    compat.mark_static(t, dim)
        return t

    return mark


class AdaptiveLoader:
    """Iterate once per epoch; yields micro-batches whose sizes follow ``run``'s plan.

    ``run`` is any :class:`~simigrad_compile.runtime.core.StepCore`: the loader reads ``run.state`` and drives
    the window through ``window_sizes``, ``open_window``, ``set_sync_gradients`` and ``finish_epoch``."""

    def __init__(self, run, dataset, *, shuffle: bool = False, collate_fn: Optional[Callable] = None,
                 drop_last: bool = False, seed: int = 0, device: Any = None, **dataloader_kwargs):
        for bad in ("batch_size", "sampler", "batch_sampler"):
            if bad in dataloader_kwargs:
                raise TypeError(f"run.dataloader() sets the batch itself; remove {bad!r}")
        if dataloader_kwargs.get("in_order", True) is False:
            raise TypeError("run.dataloader() matches each micro-batch to its place in the stream and needs "
                            "in_order=True; remove in_order=False")
        self.run, self.dataset = run, dataset
        self.shuffle, self.drop_last, self.seed, self.device = shuffle, drop_last, seed, device
        self.collate_fn = collate_fn or tud.default_collate
        self.world, self.rank = run.world_size, run.rank
        self.discarded = 0
        """Micro-batches prefetched in a size the plan no longer wanted (their samples were handed out again)."""
        dim = run.config.batch_dim if isinstance(run.config.batch_dim, int) else 0
        self._mark = mark_batch(dim, device, run.config.symbolic_batch)
        self.iterable = isinstance(dataset, tud.IterableDataset)
        if self.iterable:
            self._check_iterable()
            self.loader = tud.DataLoader(dataset, batch_size=None, collate_fn=_identity, **dataloader_kwargs)
            self._carry = None
        else:
            self.orders = _Orders(len(dataset), shuffle, seed, self.world, self.rank, drop_last)
            self.issuer = _Issuer(self.orders, run, drop_last)
            self.loader = tud.DataLoader(dataset, batch_sampler=self.issuer, collate_fn=self.collate_fn,
                                         **dataloader_kwargs)

    def _check_iterable(self) -> None:
        if self.shuffle:
            raise ValueError("run.dataloader(IterableDataset, shuffle=True): an IterableDataset has its own order; "
                             "shuffle inside the dataset (or use a map-style Dataset) and remove shuffle=True")
        if self.world > 1:
            raise ValueError(f"run.dataloader(IterableDataset) under data parallelism (world size {self.world}): "
                             "ranks could run out of samples at different steps and hang the gradient reduction; "
                             "use a map-style Dataset (__len__ and __getitem__), which run.dataloader shards evenly")

    def __len__(self) -> int:
        """Per-rank samples left in this epoch (the number of micro-batches depends on future batch sizes)."""
        return (len(self.dataset) if self.iterable else self.orders.length) - self.run.state.position

    def prepare(self, batch: Any) -> Any:
        """A collated micro-batch as the loader yields it: moved to ``device``, its batch dims marked."""
        if type(batch) in (tuple, list):
            return type(batch)(self._mark(t) if isinstance(t, torch.Tensor) else compat.tree_map(self._mark, t)
                               for t in batch)
        return compat.tree_map(self._mark, batch)

    def __iter__(self) -> Iterator[Any]:
        return self._stream_iterable() if self.iterable else self._stream()

    # --- map-style: workers collate micro-batches ----------------------------------------------------------
    def _stream(self) -> Iterator[Any]:
        run, state, length = self.run, self.run.state, self.orders.length
        pos = state.position
        p = self.issuer.current = _Pass(state.epoch, pos)
        batches = None
        while pos < length:
            sizes = run.window_sizes(length - pos, self.drop_last)
            if not sizes:
                log.info("simigrad: drop_last drops the last %d samples of epoch %d", length - pos, state.epoch)
                break
            window = run.open_window(sizes)
            for j, size in enumerate(sizes):
                _check_progress(window, j, sizes)
                batch, batches = self._take(batches, p, pos, sizes[j:])
                run.set_sync_gradients(j == len(sizes) - 1)
                yield self.prepare(batch)
                pos += size
            _check_complete(window, sizes)
        self.discarded += len(p.issued)  # prefetched past the pass's end
        run.finish_epoch(length)

    def _take(self, batches, p: _Pass, pos: int, sizes: Sequence[int]):
        """The micro-batch at stream position ``pos`` of size ``sizes[0]``; ``sizes``: the step's rest."""
        while True:
            if batches is None:
                batches = iter(self.loader)
            if p.issued and p.issued[0][0] == p.generation and p.issued[0][1:] != (pos, sizes[0]):
                self._reissue(p, pos, sizes)
            try:
                batch = next(batches)
            except StopIteration:  # the sampler predicted a shorter pass than the plan now asks for
                log.debug("simigrad: the loader restarts its DataLoader iterator at sample %d", pos)
                p.restart(pos, sizes)
                batches = None
                continue
            generation, start, size = p.issued.popleft()
            if generation == p.generation and start == pos and size == sizes[0]:
                return batch, batches
            self.discarded += 1
            if generation == p.generation:
                self._reissue(p, pos, sizes)

    def _reissue(self, p: _Pass, pos: int, sizes: Sequence[int]) -> None:
        log.debug("simigrad: the step wants micro-batches of %d from sample %d; %d prefetched micro-batch(es) "
                  "discarded (%d so far)", sizes[0], pos, len(p.issued), self.discarded + len(p.issued))
        p.restart(pos, sizes)

    # --- iterable: samples collated in the main process ----------------------------------------------------
    def _samples(self) -> Iterator[Any]:
        """Samples from ``run``'s position on: the rest of the current pass over the iterable, then the next
        passes (each followed by ``_END``)."""
        state = self.run.state
        carry, self._carry = self._carry, None
        if carry is not None and carry[0] == (state.epoch, state.position):
            return carry[1]
        if state.position:
            log.info("simigrad: resuming an IterableDataset at sample %d of epoch %d: reading and skipping the "
                     "samples before it", state.position, state.epoch)
        return _passes(self.loader, state.position)

    def _stream_iterable(self) -> Iterator[Any]:
        run, state = self.run, self.run.state
        samples = self._samples()
        buffer: List[Any] = []
        length, ended = None, False
        while True:
            need = run.plan.micro_batch_size * run.plan.accumulation
            while not ended and len(buffer) < need:
                s = next(samples)
                if s is _END:
                    ended = True
                    length = state.position + len(buffer)
                else:
                    buffer.append(s)
            if not buffer:
                break
            sizes = run.window_sizes(len(buffer) if ended else need, self.drop_last)
            if not sizes:
                log.info("simigrad: drop_last drops the last %d samples of epoch %d", len(buffer), state.epoch)
                break
            while len(buffer) < sum(sizes):
                s = next(samples)
                if s is _END:
                    raise ValueError("simigrad: the IterableDataset yields fewer samples in a pass than one "
                                     f"step's tail needs ({sum(sizes)})")
                buffer.append(s)
            window = run.open_window(sizes)
            for j, size in enumerate(sizes):
                _check_progress(window, j, sizes)
                batch, buffer = buffer[:size], buffer[size:]
                run.set_sync_gradients(j == len(sizes) - 1)
                yield self.prepare(self.collate_fn(batch))
            _check_complete(window, sizes)
            if ended and not buffer:
                break
        run.finish_epoch(length)
        self._carry = ((state.epoch, state.position), samples)


def _passes(loader: tud.DataLoader, skip: int) -> Iterator[Any]:
    it = iter(loader)
    collections.deque(itertools.islice(it, skip), maxlen=0)
    yield from it
    yield _END
    while True:
        yield from iter(loader)
        yield _END


class _End:
    """Marks the end of one pass over an iterable dataset."""


_END = _End()


def _identity(sample: Any) -> Any:
    return sample


_FIX = ("call run.optimizer.step() once per micro-batch, after its backward: run.optimizer, the wrapper that "
        "AdaptiveBatching made, not the optimizer you passed to it")


def _check_progress(window, j: int, sizes: Sequence[int]) -> None:
    if window.done != j:
        raise RuntimeError(f"simigrad: micro-batch {j + 1} of {len(sizes)} was requested after {window.done} "
                           f"run.optimizer.step() calls; {_FIX}")


def _check_complete(window, sizes: Sequence[int]) -> None:
    if not window.complete:
        raise RuntimeError(f"simigrad: the step ended after {window.done} of {len(sizes)} run.optimizer.step() "
                           f"calls; {_FIX}")


__all__ = ["AdaptiveLoader", "rank_order"]
