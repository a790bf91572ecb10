"""The outcome table's second workload: a small CNN classifier on scikit-learn's ``load_digits`` (1,797 real 8x8
grey-level images of hand-written digits, shipped inside the scikit-learn wheel: nothing is downloaded).

Two conv layers (16 and 32 channels, 3x3), each optionally followed by BatchNorm, ReLU, a 2x2 max-pool and one linear
layer to the 10 classes: about 10k parameters. The images are scaled to [0, 1] (pixel / 16) and split once, with a
fixed permutation (seed 1234), into 1,437 training and 360 validation images; the split is the same for every run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def load_digits_splits(val_fraction: float = 0.2):
    """(train, val): lists of ``(image [1, 8, 8] float32, label int64)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # the outcome extra holds it, not the test environment
        raise ImportError("bench_outcome's CNN workload needs scikit-learn (its load_digits images); install the "
                          "outcome extra: pip install -r requirements/outcome.txt -e .[outcome]") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_val = int(round(len(x) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return [(x[i], y[i]) for i in train.tolist()], [(x[i], y[i]) for i in val.tolist()]


class DigitsCNN(nn.Module):
    """``forward(images, labels)`` is the mean cross-entropy (the loop's convention); ``logits(images)`` for
    the evaluation."""

    def __init__(self, batch_norm: bool, width: int = 16):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.conv1, self.norm1 = nn.Conv2d(1, width, 3, padding=1), norm(width)
        self.conv2, self.norm2 = nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width)
        self.head = nn.Linear(2 * width * 4 * 4, 10)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        return self.head(x.flatten(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), y)


def batches(items: list, size: int = 128) -> list:
    return [tuple(torch.stack(t) for t in zip(*items[i : i + size])) for i in range(0, len(items), size)]


@torch.no_grad()
def evaluate_cnn(model: DigitsCNN, val_batches: list) -> tuple:
    """(mean validation cross-entropy, accuracy)."""
    model.eval()
    loss = correct = count = 0.0
    for x, y in val_batches:
        logits = model.logits(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += len(y)
    model.train()
    return loss / count, correct / count
