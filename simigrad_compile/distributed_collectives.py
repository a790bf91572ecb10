"""Collective helpers for the split-group reduction: a reduce-scatter that sends ring bytes on every backend,
and a thread that turns blocking work into futures.

gloo's ``reduce_scatter_single`` is an all-reduce followed by a slice: measured on loopback, a 64 MiB
reduce-scatter over 2 ranks sends 64 MiB per rank, twice the ring's 32 MiB (``all_gather_single`` sends the ring
amount). On gloo the reduce-scatter is therefore a ring of point-to-point exchanges, ``h - 1`` rounds of ``1/h``
of the input each; other backends use their native reduce-scatter.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.futures import Future


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """Blocking sum reduce-scatter of ``inp`` (``h * out.numel()`` elements) over ``group`` into ``out``."""
    if dist.get_backend(group) != "gloo":
        dist.reduce_scatter_single(out, inp, group=group)
        return
    h, i = dist.get_world_size(group), dist.get_group_rank(group, dist.get_rank())
    pieces = inp.view(h, -1)
    send = pieces[(i - 1) % h]
    for k in range(h - 1):
        c = (i - k - 2) % h
        recv = out if k == h - 2 else torch.empty_like(out)
        works = [dist.isend(send, group_dst=(i + 1) % h, group=group),
                 dist.irecv(recv, group_src=(i - 1) % h, group=group)]
        for w in works:
            w.wait()
        recv += pieces[c]
        send = recv


class Serial:
    """One daemon thread that runs jobs in submission order; each job completes the Future it returned."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: Callable[[], object]) -> Future:
        fut: Future = Future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put((job, fut))
        return fut

    def _run(self) -> None:
        while True:
            job, fut = self._queue.get()
            try:
                fut.set_result(job())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(e)
