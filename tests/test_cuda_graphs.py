"""The simigrad backend with ``cuda_graphs=True`` (Inductor's CUDA graph trees): statistics recorded at every
replay, per instance, against two separate half-batch passes in fp64; one graph per rung, no recompilation.

A CUDA graph replays kernels, not Python: the ``simigrad::`` ops are ``cudagraph_unsafe``, so Inductor keeps
them out of the captured graph and they record at every backward. ``triton.cudagraph_or_error`` makes a skipped
CUDA graph an error, so these tests fail if the graphs silently run without CUDA graphs.
"""

import copy
import math

import pytest
import torch

import simigrad_compile
from simigrad_testkit.models import MLP, flat_grads, half_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda_graphs=True needs a CUDA GPU")


def _compile(model):
    return torch.compile(model, backend="simigrad", options={"cuda_graphs": True})


@torch._inductor.config.patch({"triton.cudagraph_or_error": True})
def test_statistics_at_every_replay_per_instance():
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [MLP().cuda(), MLP().cuda()]  # two instances of one class: one graph, one CUDA graph per instance
    compiled = [_compile(m) for m in models]
    references = [copy.deepcopy(m).cpu().double() for m in models]
    for step in range(6):  # the CUDA graph trees warm up, record, then replay
        for model, c, ref in zip(models, compiled, references):
            x = torch.randn(8, 12, device="cuda")
            model.zero_grad(set_to_none=True)
            c(x).pow(2).mean().backward()
            got = flat_grads(model).cpu()
            stats = simigrad_compile.gradient_stats(model, reset=True)
            xd = x.cpu().double()
            d, a, b, cos = half_reference(ref, lambda rows: ref(xd[rows]).pow(2).mean(), 8)
            ref(xd).pow(2).mean().backward()
            want = flat_grads(ref)
            ref.zero_grad(set_to_none=True)
            assert (got - want).norm() / want.norm() < 1e-5, step
            assert stats.mode == "batch" and stats.reason == "", (step, stats)
            assert abs(stats.dot - d) <= 1e-4 * math.sqrt(a * b), (step, stats.dot, d)
            assert stats.sq_norm_1 == pytest.approx(a, rel=1e-4) and stats.sq_norm_2 == pytest.approx(b, rel=1e-4)
            assert stats.cosine == pytest.approx(cos, abs=1e-4)


@torch._inductor.config.patch({"triton.cudagraph_or_error": True})
def test_cuda_graph_per_rung_no_recompile():
    from torch._dynamo.utils import counters

    from test_runtime import MLP as Regressor, _drive, _plans_visiting_every_rung, data, make_run

    torch._dynamo.reset()
    model = Regressor().cuda()
    compiled = _compile(model)
    run = make_run(compiled, lr=0.01, max_micro_batch_size=16)
    x, y = data(600)
    ds = torch.utils.data.TensorDataset(x, y)
    step = lambda b: torch.nn.functional.mse_loss(compiled(b[0]), b[1]).backward()  # noqa: E731
    run.warm_up(step, ds)
    for _ in range(2):  # cudagraph trees record on the second or third call of each rung
        loader = run.dataloader(ds, device="cuda")
        for m in run.ladder.rungs:
            step(loader.prepare(loader.collate_fn([ds[i] for i in range(m)])))
    model.zero_grad(set_to_none=True)
    simigrad_compile.reset_stats(model)
    warm = counters["stats"]["unique_graphs"]
    _drive(run, ds, step, _plans_visiting_every_rung(run.ladder.rungs, 22), device="cuda")
    assert counters["stats"]["unique_graphs"] == warm
    splittable = [r for r in run.history if (r["accumulation"], r["micro_batch_size"]) != (1, 1)]  # 1 can't halve
    assert all(math.isfinite(r["cosine"]) for r in splittable)
    assert any(r["accumulation"] == 1 for r in splittable)  # those steps' statistics came from the split graph
    run.close()
