"""``SIMIGRAD_*`` environment variables: the one place that maps them to config fields.

``SIMIGRAD=1`` routes a plain ``torch.compile(model)`` to this backend (see :mod:`simigrad_compile.integrations.autoload`).
``SIMIGRAD_<FIELD>`` sets config field ``<field>``; for example ``SIMIGRAD_TARGET_SIMILARITY=0.3``.
A boolean field takes ``1``/``0`` (or true/false, yes/no, on/off: :data:`FLAGS`); other values are parsed as JSON
when they parse (numbers, lists), else taken as strings.

This is the only module that reads ``SIMIGRAD_*``, and only when a caller asks (:func:`config_from_env`):
the entry points (the backend, ``AdaptiveBatching``, the doors) take it as the base of their own options.
"""

from __future__ import annotations

import json
import os
import typing
from typing import Any, Mapping, Optional

from .config import FIELD_NAMES, ConfigError, SimigradConfig, from_mapping

PREFIX = "SIMIGRAD_"
ENABLE = "SIMIGRAD"
COMPILE_CACHE = "SIMIGRAD_COMPILE_CACHE"
NOT_CONFIG = (COMPILE_CACHE,)
"""``SIMIGRAD_*`` variables that are not config fields: ``SIMIGRAD_COMPILE_CACHE`` (a file the run loads its
compiled graphs from and saves them to, see :mod:`simigrad_compile.runtime.compile_cache`)."""


FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
"""The words a yes/no variable takes (any case): ``SIMIGRAD`` and every boolean field, ``SIMIGRAD_SYMBOLIC_BATCH=1``."""

_BOOLEAN_FIELDS = frozenset(k for k, hint in typing.get_type_hints(SimigradConfig).items() if hint is bool)


def flag(name: str, text: str) -> bool:
    """The value of the yes/no variable ``name`` set to ``text`` (:data:`FLAGS`)."""
    value = FLAGS.get(text.strip().lower())
    if value is None:
        raise ConfigError(f"environment variable {name}={text!r}: expected 1 or 0 (or true/false, yes/no, on/off)")
    return value


def enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    text = (os.environ if environ is None else environ).get(ENABLE, "")
    return flag(ENABLE, text) if text.strip() else False


def _parse(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def config_from_env(environ: Optional[Mapping[str, str]] = None,
                    defaults: Optional[Mapping[str, Any]] = None) -> SimigradConfig:
    """The config that the ``SIMIGRAD_<FIELD>`` variables set, over ``defaults``.

    Args:
        environ: the variables; None: ``os.environ``.
        defaults: field values that apply where no variable sets the field (a door's own defaults, such as the
            Hugging Face Trainer's batch); unknown keys raise.

    Returns:
        A validated :class:`~simigrad_compile.config.SimigradConfig`.

    Raises:
        ConfigError: an unknown ``SIMIGRAD_*`` variable or a bad value (the message names the variables).

    Example::

        >>> config_from_env({"SIMIGRAD_TARGET_SIMILARITY": "0.3"}, defaults={"batch_size": 8}).batch_size
        8
    """
    environ = os.environ if environ is None else environ
    values = {}
    for name, text in environ.items():
        if not name.startswith(PREFIX) or name in NOT_CONFIG:
            continue
        key = name[len(PREFIX):].lower()
        if key not in FIELD_NAMES:
            valid = ", ".join(PREFIX + f.upper() for f in FIELD_NAMES)
            raise ConfigError(f"unknown environment variable {name}; valid ones: {ENABLE}, {valid}, "
                              f"{', '.join(NOT_CONFIG)}")
        value = flag(name, text) if key in _BOOLEAN_FIELDS else _parse(text)
        if isinstance(value, list):
            value = tuple(value)
        values[key] = value
    try:
        return from_mapping({**(defaults or {}), **values})
    except ConfigError as err:
        raise ConfigError(f"from environment ({', '.join(PREFIX + k.upper() for k in values)}): {err}") from None


__all__ = ["ENABLE", "FLAGS", "PREFIX", "config_from_env", "enabled", "flag"]
