"""What an unmodified loop fed since its last ``optimizer.step()`` (the ``SIMIGRAD=1`` door's record): the batches
its DataLoader iterators produced, which of them a backward consumed, and the sum of the backpropagated losses."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Fetch:
    source: "weakref.ref"
    """The DataLoader iterator that produced the batch."""
    declared: Optional[int]
    measured: Optional[int]
    consumed: bool = False

    @property
    def samples(self) -> Optional[int]:
        return self.measured or self.declared


@dataclass
class Fed:
    """What the loop fed since the last ``step()``: the batches that backward passes consumed and the sum of their
    losses (constant memory, whether or not a step ever comes)."""

    last: Optional[Fetch] = None
    fetches: int = 0
    samples: Optional[int] = 0      # None once a consumed batch had no size
    declared: Optional[int] = 0
    source: Optional["weakref.ref"] = None
    loss: Optional[torch.Tensor] = None
    in_backward: bool = False
    own_step: bool = False

    def backward(self, tensor: torch.Tensor) -> None:
        fetch = self.last
        if fetch is not None and not fetch.consumed:  # a second backward on the same batch counts it once
            fetch.consumed = True
            self.fetches += 1
            self.source = fetch.source
            self.samples = None if self.samples is None or not fetch.samples else self.samples + fetch.samples
            self.declared = None if self.declared is None or not fetch.samples else \
                self.declared + (fetch.declared or fetch.samples)
        loss = getattr(tensor, "_simigrad_loss", tensor)
        if loss.numel() == 1:
            value = loss.detach().reshape(())
            value = value if value.dtype == torch.float64 else value.float()
            self.loss = value if self.loss is None else self.loss + value

    def peek(self):
        """The consumed batches' count, samples, declared size and source; without a backward, the last batch."""
        if self.fetches == 0 and self.last is not None:  # torch.autograd.backward, autograd.grad: no backward seen
            f = self.last
            return 1, f.samples, f.declared or f.samples, f.source
        return self.fetches, self.samples or None, self.declared or None, self.source

    def take(self):
        """What ``step()`` ends: (batches, samples, source, loss); the record starts again."""
        fetches, samples, _, source = self.peek()
        loss = self.loss
        self.drop()
        return fetches, samples, source, loss

    def drop(self) -> None:
        self.fetches, self.samples, self.declared, self.source, self.loss = 0, 0, 0, None, None
