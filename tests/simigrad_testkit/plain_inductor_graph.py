"""The gradient plain Inductor computes, without Inductor's code generation: the split fuzzer's reference.

``backend="simigrad"`` hands its joint graph to AOTAutograd with Inductor's decomposition table (also with
``compiler="aot_eager"``), so the graph it splits is the one plain ``torch.compile`` builds; plain ``aot_eager``
keeps the fused ATen ops instead, which round differently. In bf16 the difference is not small: with
BatchNorm in training mode, Inductor's decomposition of the BatchNorm forward makes the gradient of the layer
before it 67% off fp64 where the fused ATen kernels are 3% off, and plain ``backend="inductor"`` agrees with
the decomposed graph (``test_split_fuzz.py::test_bf16_batchnorm_gradient_is_plain_inductors``). So the
reference is :func:`plain_inductor_graph`: AOTAutograd, Inductor's decompositions, the default partitioner,
the graphs run eagerly, and no simigrad pass.
"""

from __future__ import annotations


def plain_inductor_graph(gm, example_inputs):
    """A ``torch.compile`` backend: plain Inductor's forward and backward graphs, run eagerly."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor import lowering  # noqa: F401  (registers decompositions some entries of the table use)
    from torch._inductor.decomposition import select_decomp_table

    def boxed_nop(graph, inputs):
        return make_boxed_func(graph.forward)

    backend = aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, decompositions=select_decomp_table())
    return backend(gm, example_inputs)
