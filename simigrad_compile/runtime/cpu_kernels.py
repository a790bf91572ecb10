"""Inductor's compiled CPU kernels (the ``.so`` files its C++ code caches built or loaded), for the cache file.

``torch.compiler.save_cache_artifacts`` carries each graph's generated C++ source, not the built kernels, so a
process that loads a cache file into an empty Inductor cache still runs the host compiler once per kernel (most
of a cold compile on CPU). The built kernels live in Inductor's cache directory under a path named by the hash
of their source and compile command (compiler flags, vector ISA, include and library paths); Inductor builds a
kernel only when that file is missing. So the ``.so`` files this process loaded, written back under the same
relative paths, are found instead of built where the source and the command match, and ignored where they do
not (another ISA, another torch install): a different key names a different path.

A kernel file is native code: load cache files only from where you would load a checkpoint or a package.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Dict

from .. import compat

log = logging.getLogger("simigrad_compile")


def _cache_dir() -> str:
    return os.path.realpath(compat.inductor_cache_dir())


def loaded_kernel_files() -> Dict[str, bytes]:
    """``{path relative to Inductor's cache dir: bytes}`` of every C++ library this process loaded from there."""
    root, files = _cache_dir(), {}
    for path in map(os.path.realpath, compat.loaded_cpp_libraries()):
        rel = os.path.relpath(path, root)
        if rel.startswith(os.pardir) or not os.path.isfile(path):
            continue  # built elsewhere (a custom op's extension): not Inductor's to find
        with open(path, "rb") as f:
            files[rel] = f.read()
    return files


def restore_kernel_files(files: Dict[str, bytes]) -> int:
    """Write ``files`` (from :func:`loaded_kernel_files`) into this process's Inductor cache dir where missing;
    returns how many were written."""
    root, written = _cache_dir(), 0
    paths = {rel: os.path.realpath(os.path.join(root, rel)) for rel in files}
    for rel, path in paths.items():  # all checked before any is written
        if os.path.commonpath([root, path]) != root or not rel.endswith(".so"):
            raise ValueError(f"simigrad: the compile cache names a kernel file {rel!r} that is not a .so inside "
                             f"Inductor's cache dir; it was not written by save_compile_cache: delete the file")
    for rel, data in files.items():
        path = paths[rel]
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernel.", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        written += 1
    log.debug("simigrad: %d of %d CPU kernel files written to %s", written, len(files), root)
    return written


__all__ = ["loaded_kernel_files", "restore_kernel_files"]
