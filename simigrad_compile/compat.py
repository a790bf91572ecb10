"""Every private torch API the package touches (outside ``kernels/``, which imports nothing of the package).

Tested torch range: 2.13.x (the CPU build in CI; ``pyproject.toml`` asks for ``torch>=2.13.0``). A newer torch
that moves one of these names breaks here, in one file, not across the package. Heavy modules (Dynamo, Inductor,
AOTAutograd) are imported on first use, so importing this module costs nothing at ``import torch``.

The IR vocabulary the passes read (``torch.ops.aten.*``, ``torch.ops.prims.*``, FX nodes' ``meta``) is not
listed: it is what a graph pass works on.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map  # noqa: F401  (re-exported)

TESTED_TORCH = ">=2.13,<2.14"


def __getattr__(name: str):
    """``FloorDiv`` (sympy's form of a SymInt ``B // 2``) and ``CustomGraphPass``, imported on first use."""
    if name == "FloorDiv":
        from torch.utils._sympy.functions import FloorDiv

        return FloorDiv
    if name == "CustomGraphPass":
        from torch._inductor.custom_graph_pass import CustomGraphPass

        return CustomGraphPass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_prims() -> None:
    """Defines ``torch.ops.prims.*`` (Inductor's decompositions emit some of them)."""
    import torch._prims  # noqa: F401


def dynamo_config():
    import torch._dynamo

    return torch._dynamo.config


def mark_static(tensor: torch.Tensor, dim: int) -> None:
    torch._dynamo.mark_static(tensor, dim)


def reset_dynamo() -> None:
    torch._dynamo.reset()


def compilation_time_metrics() -> dict:
    from torch._dynamo.utils import compilation_time_metrics as metrics

    return metrics


def compile_cache_counters() -> dict:
    """Inductor's FX-graph cache and AOTAutograd's cache hits and misses in this process so far (Dynamo's
    ``counters``): a miss is a graph compiled, a hit one loaded."""
    from torch._dynamo.utils import counters

    return {"fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def inductor_compile(gm, example_inputs, mode, patches: dict):
    """Inductor's ``compile_fx`` with ``mode``'s options and ``patches`` (``config_patches``) applied."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    options = dict(list_mode_options(mode)) if mode else {}
    options.update(patches)
    return compile_fx(gm, example_inputs, config_patches=options)


def aot_eager_compile(gm, example_inputs, on_joint_graph):
    """AOTAutograd with Inductor's decompositions and no code generation; ``on_joint_graph(graph)`` runs on the
    joint graph before the default partitioner (as ``joint_custom_pre_pass`` does under Inductor)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import default_partition
    from torch._inductor import lowering  # noqa: F401  (Inductor's decompositions, max-pool's among them, use it)
    from torch._inductor.decomposition import select_decomp_table

    def partition(joint, joint_inputs, **kwargs):
        on_joint_graph(joint.graph)
        joint.recompile()
        return default_partition(joint, joint_inputs, **kwargs)

    def boxed_nop(graph, inputs):
        return make_boxed_func(graph.forward)

    backend = aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partition,
                           decompositions=select_decomp_table())
    return backend(gm, example_inputs)


def current_autograd_node():
    """The autograd node the engine is running on this thread (None outside a backward)."""
    return torch._C._current_autograd_node()


def graph_task_keeps_graph() -> bool:
    """Whether the running backward was called with ``retain_graph=True`` (or ``create_graph``)."""
    return torch._C._autograd._get_current_graph_task_keep_graph()
