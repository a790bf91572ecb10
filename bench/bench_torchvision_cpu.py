"""Import PyPI's torchvision next to a CPU build of torch.

PyPI's torchvision wheel for Linux is built against torch's CUDA build: its C extension ``_C.so`` links
``libc10_cuda.so`` and ``libtorch_cuda.so``, which only the CUDA build of torch ships (the wheel bundles
``libcudart`` itself, so no ``nvidia-*`` runtime package helps). Next to the CPU torch the extension fails to
load, and torchvision 0.28 then fails at import: its ``_meta_registrations`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` without checking that the extension loaded.

The model definitions (classification, and what timm and transformers import) are pure Python and need none of
the extension's ops. :func:`ensure_importable` declares the two missing schemas, without kernels, so that the
import succeeds; calling ``torchvision.ops.nms`` then raises torch's "no kernel" error instead of running
anything wrong. Where the extension loads (a CPU torchvision from PyTorch's CPU index, or CUDA torch), it does
nothing. Call it before the first ``import torchvision`` (or ``import timm``).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import os

import torch

log = logging.getLogger("simigrad_compile.bench")
_DECLARED: list = []


def extension_error() -> str | None:
    """Why torchvision's ``_C`` extension cannot load here, or None when it loads (or torchvision is absent)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if not found:
        return "torchvision has no _C extension"
    try:
        ctypes.CDLL(found[0])  # the loader's own message names the missing library
    except OSError as e:
        return str(e)
    return None


def ensure_importable() -> str | None:
    """Make ``import torchvision`` work without its C extension; returns the load error it worked around."""
    if "torchvision" in __import__("sys").modules or _DECLARED:
        return None
    why = extension_error()
    if why is None:
        return None
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _DECLARED.append(lib)  # a Library deregisters its definitions when collected
    log.warning("torchvision's C extension does not load (%s); its ops are unavailable, its models work", why)
    return why
