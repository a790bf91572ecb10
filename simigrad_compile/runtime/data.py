"""The adaptive loader: micro-batches of the current rung, every sample once per epoch.

Order. Each epoch has one permutation (``seed + epoch``, as ``DistributedSampler``); under ``torch.distributed``
it is padded to a multiple of the world size by repeating its head (or truncated with ``drop_last``) and rank
``r`` takes ``perm[r::world]``. A rank's order never depends on the batch size, so workers may prefetch freely.

Loading. A ``torch.utils.data.DataLoader`` (with the user's ``num_workers``, ``pin_memory``, ...) fetches
chunks of samples in that order and returns them uncollated; the main process cuts micro-batches of the current
rung from the stream and applies the user's ``collate_fn``. Collation therefore runs in the main process: the
price of changing the batch size at any step without discarding prefetched work.

Epoch tail. When fewer samples remain than the step's plan, the last step takes whole micro-batches of the
current rung, then rungs from largest down (``Ladder.tail``), then one short micro-batch for the rest (a new
shape: one more compile, logged). With ``drop_last=True`` the samples that do not fill a whole step are dropped.

Static shapes. The batch dim of every tensor in a micro-batch is marked static (``torch._dynamo.mark_static``),
so Dynamo compiles one graph per rung instead of turning the batch dim dynamic. A tensor copied afterwards (for
example ``x.cuda()``) loses the mark: pass ``device=`` to move it here first.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, List, Optional

import torch
import torch.utils.data as tud
from torch.utils._pytree import tree_map

log = logging.getLogger("simigrad_compile")


def _as_list(samples: list) -> list:
    return samples


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


class _ChunkSampler(tud.Sampler):
    """Yields this rank's order from the loader's position, ``chunk`` indices at a time."""

    def __init__(self, loader: "AdaptiveLoader", chunk: int):
        self.loader, self.chunk = loader, chunk

    def __iter__(self):
        order, start = self.loader._order(), self.loader.run._position
        for i in range(start, len(order), self.chunk):
            yield order[i : i + self.chunk]

    def __len__(self) -> int:
        return -(-len(self.loader._order()) // self.chunk)


class AdaptiveLoader:
    """Iterate once per epoch; yields micro-batches whose sizes follow ``run``'s plan."""

    def __init__(self, run, dataset, *, shuffle: bool = False, collate_fn: Optional[Callable] = None,
                 drop_last: bool = False, seed: int = 0, device: Any = None, chunk: Optional[int] = None,
                 **dataloader_kwargs):
        for bad in ("batch_size", "sampler", "batch_sampler"):
            if bad in dataloader_kwargs:
                raise TypeError(f"run.dataloader() sets the batch itself; remove {bad!r}")
        self.run, self.dataset = run, dataset
        self.shuffle, self.drop_last, self.seed, self.device = shuffle, drop_last, seed, device
        self.collate_fn = collate_fn or tud.default_collate
        self.world, self.rank = run.world_size, run.rank
        chunk = chunk or run.ladder.rungs[0]
        self._cache = (None, None)
        self.loader = tud.DataLoader(dataset, batch_sampler=_ChunkSampler(self, chunk), collate_fn=_as_list,
                                     **dataloader_kwargs)

    def _order(self) -> List[int]:
        epoch = self.run._epoch
        if self._cache[0] != epoch:
            self._cache = (epoch, rank_order(len(self.dataset), epoch, self.shuffle, self.seed, self.world,
                                             self.rank, self.drop_last))
        return self._cache[1]

    def __len__(self) -> int:
        """Per-rank samples left in this epoch (the number of micro-batches depends on future batch sizes)."""
        return len(self._order()) - self.run._position

    def _finish(self, batch: Any) -> Any:
        dim = self.run.config.batch_dim if isinstance(self.run.config.batch_dim, int) else 0

        def mark(t):
            if isinstance(t, torch.Tensor):
                if self.device is not None:
                    t = t.to(self.device, non_blocking=True)
                if t.dim() > dim:
                    torch._dynamo.mark_static(t, dim)
            return t

        return tree_map(mark, batch)

    def __iter__(self) -> Iterator[Any]:
        run = self.run
        remaining = len(self)
        stream = iter(self.loader)
        buffer: List[Any] = []
        while remaining > 0:
            sizes = run._window_sizes(remaining, self.drop_last)
            if not sizes:
                log.info("simigrad: drop_last drops the last %d samples of epoch %d", remaining, run._epoch)
                break
            window = run._open_window(sizes)
            for j, size in enumerate(sizes):
                if window.done != j:
                    raise RuntimeError(f"simigrad: call run.optimizer.step() once per micro-batch (micro-batch {j} "
                                       f"of {len(sizes)} requested after {window.done} step() calls)")
                while len(buffer) < size:
                    buffer.extend(next(stream))
                batch, buffer = buffer[:size], buffer[size:]
                run._sync_gradients(j == len(sizes) - 1)
                yield self._finish(self.collate_fn(batch))
            if not window.complete:
                raise RuntimeError(f"simigrad: the step ended after {window.done} of {len(sizes)} step() calls")
            remaining -= sum(sizes)
        run._end_epoch()


__all__ = ["AdaptiveLoader", "rank_order"]
