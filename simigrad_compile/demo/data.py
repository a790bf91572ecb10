"""Byte-level language-modelling data from the Python standard library's own top-level ``*.py`` files.

Every Python installation ships these files, so the demo downloads nothing. Files are sorted by name and
``files[5::10]`` are held out for validation; the rest are for training.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))
    if not any(path.glob("*.py")):
        path = Path(os.path.dirname(os.__file__))
    return path


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train files, validation files)."""
    files = sorted(stdlib_dir().glob("*.py"))
    if len(files) < 20:
        raise RuntimeError(f"found only {len(files)} *.py files in {stdlib_dir()}; the demo needs the stdlib sources")
    held_out = set(files[5::10])
    return [f for f in files if f not in held_out], files[5::10]


def read_bytes(files: list[Path]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8)


class ByteChunks(Dataset):
    """Non-overlapping windows of ``context + 1`` bytes; item ``i`` is ``(x, y)`` with ``y`` shifted by one."""

    def __init__(self, data: torch.Tensor, context: int):
        self.data = data
        self.context = context

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.context

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i * self.context : (i + 1) * self.context + 1].long()
        return chunk[:-1], chunk[1:]


def load_splits(context: int) -> tuple[ByteChunks, ByteChunks]:
    train_files, val_files = stdlib_files()
    return ByteChunks(read_bytes(train_files), context), ByteChunks(read_bytes(val_files), context)
