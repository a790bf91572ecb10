"""An ATen call node's arguments by their schema name, not by position.

A traced graph passes most arguments by position, so ``convolution_backward``'s ``output_mask`` is
``node.args[10]``. These helpers find it from the op's schema instead, whether the graph passed it by position,
by keyword, or left it to its default::

    convolution_backward(Tensor grad_output, Tensor input, Tensor weight, SymInt[]? bias_sizes, SymInt[] stride,
                         SymInt[] padding, SymInt[] dilation, bool transposed, SymInt[] output_padding,
                         SymInt groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)

    argument(node, "output_mask")                  # [True, True, False]
    with_argument(node, "output_mask", [False, True, False])  # (args, kwargs) of the call with the new mask
    position(aten.convolution_backward.default, "output_mask")  # 10
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import torch.fx as fx

from ...compat import op_schema


@functools.lru_cache(maxsize=None)
def position(target, name: str) -> int:
    """The index of argument ``name`` in ``target``'s schema (its position when passed positionally).

    Raises:
        KeyError: ``target`` has no schema (not an ATen overload) or no argument ``name``.
    """
    schema = op_schema(target)
    if schema is None:
        raise KeyError(f"{target} has no op schema, so its argument {name!r} cannot be looked up by name")
    for i, arg in enumerate(schema.arguments):
        if arg.name == name:
            return i
    raise KeyError(f"{target} has no argument {name!r}; its schema is {schema}")


def argument(node: fx.Node, name: str) -> Any:
    """The value ``node`` passes for argument ``name`` (positional, keyword, or the schema's default).

    Raises:
        KeyError: as :func:`position`, or ``node`` omits a required argument.
    """
    i = position(node.target, name)
    arg = op_schema(node.target).arguments[i]
    if i < len(node.args) and not arg.kwarg_only:
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    if arg.has_default_value():
        return arg.default_value
    raise KeyError(f"{node.format_node()} passes no {name!r} and the schema gives no default")


def with_argument(node: fx.Node, name: str, value: Any, args: Optional[tuple] = None) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` of ``node``'s call (with positional ``args`` instead of its own, when given) with
    argument ``name`` set to ``value``, in the same form (positional where the call passes it positionally)."""
    i = position(node.target, name)
    args, kwargs = list(node.args if args is None else args), dict(node.kwargs)
    if i < len(args):
        args[i] = value
    else:
        kwargs[name] = value
    return tuple(args), kwargs
