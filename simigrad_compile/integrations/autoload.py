"""What ``SIMIGRAD=1`` does in a process that never imports ``simigrad_compile``.

How it gets loaded: torch's own plugin hook. ``import torch`` ends by calling every entry point of the group
``torch.backends`` (``torch/__init__.py``, ``_import_device_backends``, RFC pytorch/pytorch#122468) unless
``TORCH_DEVICE_BACKEND_AUTOLOAD=0``. ``pyproject.toml`` declares
``simigrad = "_simigrad_compile_autoload:torch_autoload"`` in that group, so ``pip install .`` and
``pip install -e .`` both install the hook with the distribution's metadata: no ``.pth`` file, no setup.py.

``_simigrad_compile_autoload`` is a one-function top-level module, outside the package on purpose: with
``SIMIGRAD`` unset or off it reads that one variable and returns, importing nothing of ``simigrad_compile``
(about 0.4 ms for the module, 7 us for the call, against about 1.7 s for ``import torch`` on the 2-core CI
machine), and a broken ``simigrad_compile`` cannot break ``import torch``. Nothing in torch is touched: the
numbers are bit-identical to those under ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` (tests/test_autoload.py). Any other
value of ``SIMIGRAD`` lands in :func:`torch_autoload` here, which validates it.

With ``SIMIGRAD=1``:

1. Every ``SIMIGRAD_*`` variable is validated at ``import torch``. A bad one makes ``import torch`` fail with
   torch's ``RuntimeError("Failed to load the backend extension: simigrad ...")`` whose cause is our
   :class:`~simigrad_compile.config.ConfigError` naming the variable.
2. ``torch.compile`` without a ``backend`` argument (also ``backend=None``, ``nn.Module.compile()`` and the
   decorator form) uses ``"simigrad"``, resolved through the ``torch_dynamo_backends`` entry point. We do not
   call ``torch.compiler.set_default_backend("simigrad")`` here because it imports ``torch._dynamo`` (1.5 s on
   the 2-core CI machine) inside ``import torch``. Instead ``torch.compile`` is replaced by a one-shot
   trampoline: its first call sets that default (unless the user has already set one other than
   ``"inductor"``), puts the original ``torch.compile`` back, and calls it. An explicit ``backend=`` is
   honoured.
3. Unmodified training loops get adaptive batching: :func:`simigrad_compile.integrations.auto_loop.install`, unless
   ``SIMIGRAD_AUTO_LOOP=false``.

DataLoader worker processes import torch too; they validate the variables and install the (unused) hooks.

Limits: ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` turns off every ``torch.backends`` entry point, this one included;
``SIMIGRAD=1`` then has no effect on a script that never imports ``simigrad_compile``. A user who calls
``torch.compiler.set_default_backend("inductor")`` before the first ``torch.compile`` is indistinguishable from
one who did not, and gets ``simigrad``.
"""

from __future__ import annotations

import functools
import logging

from .. import envvars

log = logging.getLogger("simigrad_compile")
BACKEND = "simigrad"


def torch_autoload() -> None:
    """Called at the end of ``import torch`` (through ``_simigrad_compile_autoload``) when SIMIGRAD is not off."""
    if not envvars.enabled():
        return
    config = envvars.config_from_env()
    route_default_backend()
    if config.auto_loop:
        from . import auto_loop

        auto_loop.install(config)


def route_default_backend() -> None:
    import torch

    original = torch.compile
    if getattr(original, "_simigrad_trampoline", False):
        return

    @functools.wraps(original)
    def compile(*args, **kwargs):
        if torch.compile is compile:
            torch.compile = original
        current = torch.compiler.get_default_backend()
        if current == "inductor":
            torch.compiler.set_default_backend(BACKEND)
            log.info("simigrad: SIMIGRAD=1, torch.compile's default backend is now %r", BACKEND)
        elif current != BACKEND:
            log.warning("simigrad: SIMIGRAD=1 but the default backend was set to %r; leaving it", current)
        return original(*args, **kwargs)

    compile._simigrad_trampoline = True
    torch.compile = compile
