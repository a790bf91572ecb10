"""Third-party packages in tests: PyPI's torchvision beside the CPU torch is made importable the one way the
census uses too (``bench/torchvision_cpu.py``), so transformers, timm and lightning import."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import torchvision_cpu  # noqa: E402


def ensure_torchvision() -> None:
    """Call before the first import of torchvision, transformers, timm or lightning."""
    torchvision_cpu.ensure_importable()
