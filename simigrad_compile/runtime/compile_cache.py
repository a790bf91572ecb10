"""Portable compile caches: the compiled ladder in one file, loaded on every rank, node and restart.

Two doors (``docs/compile_cache.md``):

* :func:`save_compile_cache` / :func:`load_compile_cache`: module functions, process-wide (Inductor's caches
  are). Save after the ladder is compiled (``run.warm_up``), load before the first compile.
* ``SIMIGRAD_COMPILE_CACHE=path``: :class:`~simigrad_compile.runtime.adaptive.AdaptiveBatching` loads ``path``
  when it is created (if the file exists) and, on rank 0, saves it after ``run.warm_up`` and at ``run.close()``
  whenever this process compiled a graph since the file was loaded (or there was no file).

The file is a zip of ``torch.compiler.save_cache_artifacts()`` (Inductor's FX-graph cache entries, AOTAutograd's,
autotuning results and Dynamo's shape profiles, for every graph this process compiled or loaded from a cache)
and the CPU kernels this process loaded (:mod:`~simigrad_compile.runtime.cpu_kernels`: the built ``.so`` files,
which the artifacts lack). Loading writes both into the local caches (``TORCHINDUCTOR_CACHE_DIR``); Dynamo still
traces each graph (a fraction of the cost), and Inductor and AOTAutograd then hit instead of compiling, and
find each CPU kernel built. A file holding only torch's artifacts (written before the zip) loads as well.

The split pass does not run on a hit: what it decided (the halves, the statistics ops) is in the cached graph,
and the backend still builds the region plan and the statistics sinks at every compile, so the statistics come
out as after a cold compile (``tests/test_compile_cache.py`` checks them against the fp64 two-half reference
in a fresh process). The cache keys hold the torch version, the graph, and the pass manager's ``uuid`` (the
passes' source and the region plan): a file written by another torch or simigrad version, or for another
model, only misses. The process then compiles, logs how many graphs it compiled despite the file, and (through
the environment variable) writes a new file.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import tempfile
import zipfile
from typing import Dict, Optional

import torch

from .. import compat
from ..envvars import COMPILE_CACHE as ENV
from .cpu_kernels import loaded_kernel_files, restore_kernel_files

log = logging.getLogger("simigrad_compile")


class CompileCacheError(RuntimeError):
    """A compile-cache file that cannot be read."""


@dataclasses.dataclass(frozen=True)
class CacheFile:
    """One saved or loaded cache file: its path, its size in bytes, its artifacts by kind, its CPU kernels."""

    path: str
    size: int
    artifacts: Dict[str, int]
    cpu_kernels: int = 0

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.artifacts.items())) or "no artifacts"
        return f"{self.path} ({self.size / 2**20:.2f} MiB: {kinds}; {self.cpu_kernels} CPU kernels)"


ARTIFACTS = "torch_cache_artifacts"
KERNELS = "cpu_kernels/"


def _pack(artifacts: bytes, kernels: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr(ARTIFACTS, artifacts)
        for rel, data in sorted(kernels.items()):
            z.writestr(KERNELS + rel, data)
    return buf.getvalue()


def _unpack(data: bytes):
    """``(torch's artifacts, {relative path: kernel bytes})``; a file of torch's artifacts alone has no kernels."""
    if not data.startswith(b"PK"):
        return data, {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        kernels = {n[len(KERNELS):]: z.read(n) for n in z.namelist() if n.startswith(KERNELS)}
        return z.read(ARTIFACTS), kernels


def _kinds(info) -> Dict[str, int]:
    return {kind: len(keys) for kind, keys in info.artifacts.items()}


def compiled_graphs() -> int:
    """Graphs Inductor and AOTAutograd compiled in this process so far (their cache misses)."""
    c = compat.compile_cache_counters()
    return c["fxgraph_miss"] + c["autograd_miss"]


def save_compile_cache(path: str) -> Optional[CacheFile]:
    """Write every graph compiled (or loaded from a cache) in this process to ``path``, atomically.

    Returns what was written, or None when this process compiled nothing through Inductor (``aot_eager``
    graphs have no cache artifacts). Call it on one rank: every rank compiles the same graphs."""
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        log.warning("simigrad: nothing to save to %s: no graph was compiled through Inductor in this process "
                    "(aot_eager graphs have no cache artifacts)", path)
        return None
    artifacts, info = result
    kernels = loaded_kernel_files()
    data = _pack(artifacts, kernels)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".compile_cache.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    saved = CacheFile(str(path), len(data), _kinds(info), len(kernels))
    log.info("simigrad: compile cache saved to %s", saved)
    return saved


def load_compile_cache(path: str) -> CacheFile:
    """Load a file written by :func:`save_compile_cache` into this process's compile caches.

    Call it before the first compile. Raises ``FileNotFoundError`` for a missing file and
    :class:`CompileCacheError` for one torch cannot read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"simigrad: no compile cache at {path!r}; write one with "
                                f"simigrad_compile.save_compile_cache({path!r}) after warm-up") from None
    try:
        artifacts, kernels = _unpack(data)
        info = torch.compiler.load_cache_artifacts(artifacts)
    except (zipfile.BadZipFile, KeyError):
        info = None
    if info is None:
        raise CompileCacheError(f"simigrad: {path!r} ({len(data)} bytes) is not a torch compile cache this torch "
                                f"{torch.__version__} can read; delete it and save a new one after warm-up")
    restore_kernel_files(kernels)
    loaded = CacheFile(str(path), len(data), _kinds(info), len(kernels))
    log.info("simigrad: compile cache loaded from %s", loaded)
    return loaded


class EnvCompileCache:
    """The ``SIMIGRAD_COMPILE_CACHE`` door of one run: loads at creation, saves (rank 0) when it compiled."""

    def __init__(self, rank: int, environ=None):
        environ = os.environ if environ is None else environ
        self.path = environ.get(ENV) or None
        self.rank = rank
        self.loaded: Optional[CacheFile] = None
        """The file loaded when the run was created (None: no variable, no file, or unreadable)."""
        self.saved: Optional[CacheFile] = None
        self._compiled_at_save = compiled_graphs()
        """Graphs compiled in this process when the file was last loaded, saved or checked."""
        if self.path is None:
            return
        if not os.path.exists(self.path):
            log.info("simigrad: %s=%s: no file yet; %s", ENV, self.path,
                     "rank 0 saves it after warm-up" if rank == 0 else "rank 0 writes it")
            return
        try:
            self.loaded = load_compile_cache(self.path)
        except CompileCacheError as err:
            log.warning("%s (from %s); compiling from scratch, and rank 0 overwrites the file", err, ENV)

    def save(self, when: str) -> Optional[CacheFile]:
        """Saves the file (rank 0) if it is missing or this process compiled a graph since it loaded or saved it."""
        if self.path is None:
            return None
        compiled = compiled_graphs() - self._compiled_at_save
        self._compiled_at_save += compiled
        if self.loaded is not None and compiled:
            log.warning("simigrad: %d graph(s) compiled at %s despite the compile cache %s (a new rung, model, "
                        "config, or torch/simigrad version)%s", compiled, when, self.path,
                        "; saving an updated file" if self.rank == 0 else "")
        if self.rank != 0 or not (compiled or not os.path.exists(self.path)):
            return None
        self.saved = save_compile_cache(self.path)
        return self.saved


__all__ = ["CacheFile", "CompileCacheError", "ENV", "EnvCompileCache", "compiled_graphs", "load_compile_cache",
           "save_compile_cache"]
