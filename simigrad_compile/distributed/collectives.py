"""Blocking collectives of the split-group reduction, and the thread that runs them in order.

On gloo the reduce-scatter and the all-gather are rings of point-to-point exchanges (``h - 1`` rounds of ``1/h``
of the buffer each), measured on this machine's loopback (2 ranks, gloo, torch 2.13):

* ``reduce_scatter_single`` is an all-reduce followed by a slice: a 64 MiB input sends 64 MiB per rank, twice the
  ring's 32 MiB;
* ``all_gather_single`` sends the ring amount but takes about twice as long as an all-reduce of the same bytes
  (4 x 4 MiB: 32-38 ms against 15-20 ms), while an isend/irecv swap of the same bytes takes 14 ms.

Other backends use their native ``reduce_scatter_single`` / ``all_gather_single``.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.futures import Future

log = logging.getLogger("simigrad_compile")


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """Blocking sum reduce-scatter of ``inp`` (``h * out.numel()`` elements) over ``group`` into ``out``."""
    start_reduce_scatter(out, inp, group)()


FIRST_TAG = 1
"""Tag of a ring's first step, which :func:`start_reduce_scatter` posts from the hook's thread; every later step
(posted by the worker thread) has tag 0. Gloo matches sends to receives per (peer, tag) in posting order, so the
two threads' posts never pair up with each other's."""


FOLD_TAG = 2
"""Tag of the statistics rows' swap, which runs alongside the last bucket's all-gather in the same group."""


def start_reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> Callable[[], None]:
    """Post the ring's first step of :func:`reduce_scatter` now; the returned function runs the rest (blocking).
    Call it in the order the reduce-scatters were started."""
    if dist.get_backend(group) != "gloo":
        return lambda: dist.reduce_scatter_single(out, inp, group=group)
    h, i = dist.get_world_size(group), dist.get_group_rank(group, dist.get_rank())
    if h == 1:
        return lambda: out.copy_(inp)
    pieces = inp.view(h, -1)
    recv = out if h == 2 else torch.empty_like(out)
    works = _post(pieces[(i - 1) % h], (i + 1) % h, recv, (i - 1) % h, group, FIRST_TAG)

    def finish() -> None:
        wait_all(works)
        r = recv
        r += pieces[(i - 2) % h]
        for k in range(1, h - 1):
            nxt = out if k == h - 2 else torch.empty_like(out)
            _swap(r, (i + 1) % h, nxt, (i - 1) % h, group)
            nxt += pieces[(i - k - 2) % h]
            r = nxt

    return finish


def all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """Blocking all-gather of ``inp`` from every rank of ``group`` into ``out`` (rank order)."""
    if dist.get_backend(group) != "gloo":
        dist.all_gather_single(out, inp, group=group)
        return
    h, i = dist.get_world_size(group), dist.get_group_rank(group, dist.get_rank())
    pieces = out.view(h, -1)
    pieces[i].copy_(inp)
    for k in range(h - 1):
        _swap(pieces[(i - k) % h], (i + 1) % h, pieces[(i - k - 1) % h], (i - 1) % h, group)


def swap(send: torch.Tensor, recv: torch.Tensor, peer: int, group) -> None:
    """Blocking exchange with one peer (a global rank): send ``send``, receive ``recv``."""
    wait_all(post_swap(send, recv, peer, group))


def post_swap(send: torch.Tensor, recv: torch.Tensor, peer: int, group, tag: int = 0) -> list:
    """Start the exchange with one peer (a global rank); returns its two pending works (for :func:`wait_all`).
    Gloo moves the bytes in its own threads."""
    peer = dist.get_group_rank(group, peer)
    return _post(send, peer, recv, peer, group, tag)


def wait_all(works) -> None:
    """Wait for pending works (``Work.wait`` releases the GIL)."""
    for w in works:
        w.wait()


def _post(send, dst: int, recv, src: int, group, tag: int = 0) -> list:
    return [dist.isend(send, group_dst=dst, group=group, tag=tag),
            dist.irecv(recv, group_src=src, group=group, tag=tag)]


def _swap(send, dst: int, recv, src: int, group) -> None:
    wait_all(_post(send, dst, recv, src, group))


class Serial:
    """One daemon thread that runs jobs in submission order; each job completes the Future it returned.

    At interpreter exit (``atexit``, before finalization) the thread is stopped and joined: a daemon thread still
    inside a torch call when the interpreter finalizes (completing the last bucket's Future while the main thread,
    woken by it, already exits) is killed on its way back into Python, and the process aborts with "terminate
    called without an active exception".
    """

    EXIT_JOIN_S = 60.0
    """How long exit waits for the jobs in flight (a collective whose peer is gone may never finish)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: Callable[[], object]) -> Future:
        fut: Future = Future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
            atexit.register(self.close, self.EXIT_JOIN_S)
        self._queue.put((job, fut))
        return fut

    def close(self, timeout: Optional[float] = None) -> None:
        """Let the submitted jobs finish, then stop the thread (a later ``submit`` starts a new one)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        atexit.unregister(self.close)
        self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("simigrad: %s still runs a collective after %.0f s; exiting without it", self._name, timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, fut = item
            try:
                fut.set_result(job())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(e)
