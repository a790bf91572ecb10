"""The census's ``--symbolic`` check: a model under ``symbolic_batch=True``, as the loader marks its batch.

``bench_coverage.py --symbolic`` marks the batch dim of every input dynamic (``mark_batch(0, None, True)``, what
``run.dataloader()`` does with ``symbolic_batch=True``) before the compiled step, and then checks the one graph:

- a model whose code specializes on the batch size gets a graph of that size (the loader's mark is Dynamo's weak
  one), which the backend names (``simigrad_compile.compile.input_sizes.SPECIALIZED``): status ``specializes``,
  with the inputs in ``rec["specialized"]``;
- the usual gradient and statistics checks run at the census batch, and then, after one more step at that batch
  (a warm-up), a step at a second batch size (``batch + 2``) must reuse the graph: ``rec["symbolic"]`` holds the
  graph counts before and after it and the statistics' mode there, and a recompile makes the status
  ``recompiles``.
"""

from __future__ import annotations


def mark(batch: dict) -> dict:
    """``batch`` with the batch dim (0) of each tensor marked dynamic, as the loader marks it."""
    from simigrad_compile.runtime.data import mark_batch

    marker = mark_batch(0, None, symbolic=True)
    return {k: marker(v) for k, v in batch.items()}


def specialized_so_far() -> dict:
    """Per input, the graphs compiled so far in this process with a specialized batch size."""
    from simigrad_compile.compile.input_sizes import SPECIALIZED

    return dict(SPECIALIZED)


def graphs() -> int:
    import torch

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def second_size(compiled, model, spec, b: int, dtype, loss_of) -> dict:
    """After a warm-up step at ``b`` samples (a model's first call can change what its guards read, as Hugging
    Face's ``config.problem_type``), one step of ``compiled`` at ``b + 2``: does it reuse the graph, and does it
    have statistics."""
    import torch

    import simigrad_compile

    def step(n: int):
        torch.manual_seed(1)
        _, batch, _ = spec.build(n)
        batch = mark({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()})
        compiled.zero_grad(set_to_none=True)
        loss_of(compiled, batch).backward()
        return simigrad_compile.gradient_stats(model, reset=True)

    first = graphs()
    step(b)
    before = graphs()
    stats = step(b + 2)
    return {"second_batch": b + 2, "graphs_first": first, "graphs_before": before, "graphs_after": graphs(),
            "second_mode": stats.mode, "second_cosine": stats.cosine}
