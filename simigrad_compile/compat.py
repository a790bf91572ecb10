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


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Dynamo compiles ``dim`` as a symbol (of 2 or more: it specializes sizes 0 and 1); a graph that specializes
    it raises at compile time. (A ``min=`` bound without ``max=`` fails inside Dynamo on torch 2.13.)"""
    torch._dynamo.mark_dynamic(tensor, dim)


def maybe_mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """As :func:`mark_dynamic`, but a graph whose code specializes ``dim`` is compiled for that size instead of
    raising (and a later size compiles another graph, with ``dim`` a symbol again)."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def weakly_dynamic_dims(tensor: torch.Tensor) -> frozenset:
    """The dims :func:`maybe_mark_dynamic` marked on ``tensor``."""
    return frozenset(getattr(tensor, "_dynamo_weak_dynamic_indices", ()))


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


def inductor_cache_dir() -> str:
    """Inductor's on-disk cache directory (``TORCHINDUCTOR_CACHE_DIR`` or its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def loaded_cpp_libraries() -> list:
    """The files of the C++ libraries Inductor's C++ code caches loaded in this process (kernels, wrappers)."""
    from torch._inductor import codecache

    paths = []
    for name in ("CppCodeCache", "CppPythonBindingsCodeCache", "CppWrapperCodeCache"):
        for load in list((getattr(getattr(codecache, name, None), "cache", None) or {}).values()):
            lib = load()
            path = getattr(lib, "__file__", None) or getattr(lib, "_name", None)
            if path:
                paths.append(path)
    return paths


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


def current_graph_task_id() -> int:
    """The id of the backward call the engine is running on this thread (-1 outside a backward)."""
    return torch._C._current_graph_task_id()


def graph_task_keeps_graph() -> bool:
    """Whether the running backward was called with ``retain_graph=True`` (or ``create_graph``)."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


def autograd_sequence_nr() -> int:
    """The sequence number the next autograd node created on this thread will get (numbers only grow, per thread;
    ``AccumulateGrad`` nodes carry the largest integer instead)."""
    return torch._C._autograd._get_sequence_nr()


def node_sequence_nr(node) -> int:
    return node._sequence_nr()


_COMPILED_FUNCTION = "CompiledFunction"  # AOTAutograd's autograd.Function, one class per compiled graph


def compiled_function_of(node):
    """AOTAutograd's ``CompiledFunction`` class whose backward ``node`` is; None for any other node (its double
    backward's node included)."""
    cls = getattr(node, "_forward_cls", None)
    return cls if getattr(cls, "__name__", None) == _COMPILED_FUNCTION else None


def backward_single_use(compiled_function) -> bool:
    """Whether AOTAutograd already compiled this ``CompiledFunction``'s backward with donated buffers: it may
    overwrite the tensors it saved, so it runs once per forward. (A backward first compiled under
    ``retain_graph=True`` donates nothing.) Read with defaults: a torch without these attributes reads False."""
    metadata = getattr(compiled_function, "metadata", None)
    return (getattr(compiled_function, "compiled_bw", None) is not None
            and bool(getattr(metadata, "bw_donated_idxs", None)))


# =====================================================================================================================
# compile/ and stats/: the split pass's view of AOTAutograd, Dynamo and Inductor, and of nn.Module's registries
# =====================================================================================================================


def op_schema(target):
    """The ``torch._C.FunctionSchema`` of an ATen overload (``aten.mm.default``), or None for any other target."""
    return getattr(target, "_schema", None)


def aot_gradient_slots(descs) -> dict:
    """Primal index -> output slot of its gradient, from AOTAutograd's labels of the joint graph's outputs
    (``output.meta["desc"]``: ``GradAOTOutput`` of a ``PlainAOTInput``)."""
    return {d.grad_of.idx: j for j, d in enumerate(descs) if type(d).__name__ == "GradAOTOutput"
            and type(getattr(d, "grad_of", None)).__name__ == "PlainAOTInput"}


def aot_tangent_output(tangent_desc):
    """The label of the forward output a tangent placeholder is the gradient of (None when unlabelled)."""
    return getattr(tangent_desc, "output", None)


def keep_in_backward(node: "torch.fx.Node") -> None:
    """Tells the min-cut partitioner to compute ``node`` in the backward graph, never to save it."""
    node.meta["partitioner_tag"] = "must_be_in_backward"


def quiet_fake_tensor_log():
    """A context that mutes FakeTensorMode's log of a kernel's exception (a probe that expects rejections)."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet():
        logger = logging.getLogger("torch._subclasses.fake_tensor")
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            logger.setLevel(level)

    return quiet()


def dynamo_source(node: "torch.fx.Node"):
    """The Dynamo ``Source`` a placeholder of Dynamo's graph was read from (None when not recorded)."""
    return getattr(node.meta.get("grapharg"), "source", None)


def source_is_local(source) -> bool:
    """``source`` is a local variable of the compiled frame (``LocalSource``)."""
    return type(source).__name__ == "LocalSource"


def source_is_attribute(source) -> bool:
    """``source`` is an attribute, a module's member, or a global (not data the caller passed in)."""
    cls = type(source).__name__
    return "Attr" in cls or "NNModule" in cls or "Global" in cls


def source_base(source):
    """The source ``source`` was derived from (its ``base``), None at a root."""
    return getattr(source, "base", None)


def foreach_copy_(dst, src) -> None:
    """``dst[i].copy_(src[i])`` for every i, in one multi-tensor call."""
    torch._foreach_copy_(dst, src)


def module_registries(module: torch.nn.Module):
    """``(parameters, children)``: the dicts an ``nn.Module`` keeps its direct parameters and submodules in."""
    return module._parameters, module._modules


_MISSING = object()


def module_member(module: torch.nn.Module, name: str):
    """``getattr(module, name, None)``, without ``nn.Module.__getattr__``'s costly miss where the class leaves
    the lookup to it (a parameter, buffer or submodule is found in its registry)."""
    cls = type(module)
    if cls.__getattr__ is not torch.nn.Module.__getattr__ or hasattr(cls, name):
        return getattr(module, name, None)
    d = module.__dict__
    value = d.get(name, _MISSING)
    if value is not _MISSING:
        return value
    for registry in ("_parameters", "_buffers", "_modules"):
        found = d.get(registry)
        if found and name in found:
            return found[name]
    return None


def compiled_original(module: torch.nn.Module):
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) wraps (its ``_orig_mod``); None when
    ``module`` has none."""
    return module_member(module, "_orig_mod")


def is_compile_wrapper(module: torch.nn.Module) -> bool:
    """``module`` is the wrapper ``torch.compile(module)`` returns."""
    return compiled_original(module) is not None and module_member(module, "dynamo_ctx") is not None


def compiled_in_place(module: torch.nn.Module) -> bool:
    """``module.compile()`` was called on ``module``."""
    return module_member(module, "_compiled_call_impl") is not None


def is_compiled_function(obj) -> bool:
    """``obj`` is a function made by ``torch.compile``."""
    return callable(obj) and hasattr(obj, "_torchdynamo_orig_callable")


def queue_backward_callback(fn) -> None:
    """Run ``fn`` when the current backward's graph task finishes (after the callbacks queued before it)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


# =====================================================================================================================
# runtime/ and integrations/: the optimizer's step hooks, the DataLoader iterator, the multi-tensor ops
# =====================================================================================================================

foreach_norm = torch._foreach_norm
"""``torch._foreach_norm(tensors, ord)``: one norm per tensor, one launch per device and dtype."""

foreach_mul_ = torch._foreach_mul_
"""``torch._foreach_mul_(tensors, scalar)``: every tensor multiplied in place."""


def share_step_hooks(wrapper: torch.optim.Optimizer, inner: torch.optim.Optimizer) -> None:
    """Make ``wrapper``'s optimizer step pre/post hook registries ``inner``'s: a hook registered on either runs
    when ``inner`` steps (``Optimizer.register_step_pre_hook`` writes ``_optimizer_step_*_hooks``)."""
    wrapper._optimizer_step_pre_hooks = inner._optimizer_step_pre_hooks
    wrapper._optimizer_step_post_hooks = inner._optimizer_step_post_hooks


def dataloader_iterator_class() -> type:
    """The base class of every ``DataLoader`` iterator (``_BaseDataLoaderIter``): its ``__next__`` sees every
    batch a loop fetches."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    return _BaseDataLoaderIter


def declared_batch_size(iterator):
    """The ``batch_size`` of the batch sampler behind a ``DataLoader`` iterator, or None (no automatic
    batching, or a batch sampler without one)."""
    sampler = iterator._index_sampler if iterator._auto_collation else None
    return getattr(sampler, "batch_size", None)


def versions(tensors) -> list:
    """Each tensor's version counter (``tensor._version``: bumped by every in-place write), None for None."""
    return [None if t is None else t._version for t in tensors]


def version(tensor: torch.Tensor) -> int:
    """``tensor._version``: the count of in-place writes to the tensor (and its views)."""
    return tensor._version


def parameter_hooks(param: torch.Tensor) -> tuple:
    """``(tensor hooks, post-accumulate-grad hooks)`` registered on ``param`` (``register_hook``,
    ``register_post_accumulate_grad_hook``), as dicts keyed by the handle's id; empty dicts when none."""
    return (getattr(param, "_backward_hooks", None) or {}), (getattr(param, "_post_accumulate_grad_hooks", None) or {})


def batches_left(iterator) -> "int | None":
    """Batches a ``DataLoader`` iterator will still yield (``len(loader)`` minus those yielded), or None when the
    loader has no length (an ``IterableDataset`` without ``__len__``)."""
    try:
        total = len(iterator)
    except TypeError:
        return None
    return total - iterator._num_yielded
