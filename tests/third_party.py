"""Import ``transformers`` and ``lightning`` in tests even where the environment's ``torchvision`` is broken.

Both import ``torchvision`` when its package metadata exists. A ``torchvision`` built for another torch (a CUDA
wheel beside the CPU torch) fails at import with ``operator torchvision::nms does not exist``, which takes both
down. These tests use no vision code: when ``torchvision`` cannot be imported (checked in a subprocess, so this
process keeps no half-imported module), it is hidden from this process, module and metadata alike.
"""

import importlib.metadata
import subprocess
import sys


def hide_broken_torchvision() -> None:
    if "torchvision" in sys.modules:
        return
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode == 0:
        return
    sys.modules["torchvision"] = None  # find_spec() says absent, import raises ModuleNotFoundError
    original = importlib.metadata.Distribution.from_name.__func__

    def from_name(cls, name):
        if name == "torchvision":
            raise importlib.metadata.PackageNotFoundError(name)
        return original(cls, name)

    importlib.metadata.Distribution.from_name = classmethod(from_name)
