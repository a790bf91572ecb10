"""torch's ``torch.backends`` entry point for simigrad-compile: ``import torch`` calls :func:`torch_autoload`.

It lives outside the package so that, with ``SIMIGRAD`` unset or off, ``import torch`` reads one environment
variable and imports nothing of ``simigrad_compile``; so a broken ``simigrad_compile`` cannot break
``import torch`` either. What ``SIMIGRAD=1`` does: :mod:`simigrad_compile.integrations.autoload`.
"""

import os


def torch_autoload() -> None:
    if os.environ.get("SIMIGRAD", "").strip().lower() in ("", "0", "false", "no", "off"):
        return
    from simigrad_compile.integrations.autoload import torch_autoload as load

    load()
