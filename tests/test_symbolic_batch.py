"""``symbolic_batch=True``: the loader marks the batch dim dynamic, so one compiled graph serves every rung of 2 or
more. Checked against the plain fp64 loop (every update) and two separate fp64 half-batch passes (every
one-micro-step statistic), with the graphs counted at the backend."""

import math

import pytest
import torch

import simigrad_compile as sc
from simigrad_compile.runtime.ladder import BatchPlan as Plan
from simigrad_testkit.loop_reference import Net, Reference, dataset, flat, loss_of, make_optimizer


class CountingSimigrad:
    """The simigrad backend (on ``aot_eager``), counting the graphs Dynamo hands it and their batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, gm, example_inputs):
        from simigrad_compile.compile.backend import simigrad_backend

        symbolic = any(isinstance(n.meta.get("example_value"), torch.SymInt)
                       for n in gm.graph.nodes if n.op == "placeholder")
        x = next(t for t in example_inputs if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)
                 and t.dim() == 2 and t.shape[1] == 5)
        self.batches.append("symbolic" if symbolic else x.shape[0])
        return simigrad_backend(gm, example_inputs, options={"compiler": "aot_eager"})


PLANS = [Plan(8, 1), Plan(2, 3), Plan(4, 1), Plan(1, 2), Plan(2, 1), Plan(8, 2), Plan(4, 3), Plan(1, 1), Plan(2, 2)]


def test_one_graph_serves_every_rung_and_every_step_is_the_plain_loops():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Net()
    ref = Reference(net, "sgd", lr=0.1, b0=8, schedule=False)
    backend = CountingSimigrad()
    compiled = torch.compile(net, backend=backend)
    run = sc.AdaptiveBatching(compiled, make_optimizer(net.parameters(), "sgd", lr=0.1), batch_size=8,
                              micro_batch_sizes=(1, 2, 4, 8), symbolic_batch=True, group_mode="auto")
    data = dataset(200)
    run.warm_up(lambda b: loss_of(compiled, *b).backward(), data)
    assert sorted(backend.batches, key=str) == [1, "symbolic"]  # a rung of 1 has its own graph

    run.plan, window = PLANS[0], []
    for x, y in run.dataloader(data):
        window.append((x, y))
        loss_of(compiled, x, y).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        if not run.optimizer.stepped:
            continue
        record, (xs, ys) = run.history[-1], (torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window]))
        plan = PLANS[len(run.history) - 1]
        assert (record["micro_batch_size"], record["accumulation"]) == (plan.micro_batch_size, plan.accumulation)
        if record["accumulation"] == 1 and len(xs) >= 2:  # the split graph's statistics: halves floor(B/2), rest
            h = len(xs) // 2
            assert record["cosine"] == pytest.approx(ref.cosine([(xs[:h], ys[:h]), (xs[h:], ys[h:])]), abs=1e-5)
        ref.step(xs, ys)
        assert torch.allclose(flat(net), flat(ref.model), rtol=1e-5, atol=1e-6), len(run.history)
        window = []
        if len(run.history) == len(PLANS):
            break
        run.plan = PLANS[len(run.history)]
    run.close()
    assert len(run.history) == len(PLANS)
    assert sorted(backend.batches, key=str) == [1, "symbolic"]  # no graph after warm-up
    assert any(r["accumulation"] == 1 and r["micro_batch_size"] >= 2 and math.isfinite(r["cosine"])
               for r in run.history)


def test_static_rungs_compile_one_graph_each():
    """The static ladder, for comparison: one graph per rung that warm-up reaches."""
    torch._dynamo.reset()
    net = Net()
    backend = CountingSimigrad()
    compiled = torch.compile(net, backend=backend)
    run = sc.AdaptiveBatching(compiled, make_optimizer(net.parameters()), batch_size=8,
                              micro_batch_sizes=(1, 2, 4, 8), group_mode="auto", symbolic_batch=False)
    run.warm_up(lambda b: loss_of(compiled, *b).backward(), dataset(64))
    run.close()
    assert sorted(backend.batches) == [1, 2, 4, 8]


def test_a_model_that_specializes_on_the_batch_gets_that_size_compiled_and_named(caplog):
    """``if x.shape[0] == 8`` makes the batch of the first graph the constant 8: it is compiled for 8 and the
    input named; the other rungs share a second, symbolic graph; the steps stay the plain fp64 loop's."""
    from simigrad_compile.compile.input_sizes import SPECIALIZED

    class Specializing(Net):
        def forward(self, x):
            out = super().forward(x)
            return out.clone() if x.shape[0] == 8 else out  # the same values: only the guard differs

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Specializing()
    ref = Reference(net, "sgd", lr=0.1, b0=8, schedule=False)
    backend = CountingSimigrad()
    compiled = torch.compile(net, backend=backend)
    run = sc.AdaptiveBatching(compiled, make_optimizer(net.parameters(), "sgd", lr=0.1), batch_size=8,
                              micro_batch_sizes=(2, 4, 8), symbolic_batch=True, group_mode="auto")
    before = SPECIALIZED["L['x']"]
    with caplog.at_level("WARNING", "simigrad_compile"):
        run.warm_up(lambda b: loss_of(compiled, *b).backward(), dataset(64))
        for plan in (Plan(4, 1), Plan(2, 1), Plan(8, 1), Plan(4, 2)):
            run.plan = plan
            window = []
            for x, y in run.dataloader(dataset(64)):
                window.append((x, y))
                loss_of(compiled, x, y).backward()
                run.optimizer.step()
                run.optimizer.zero_grad()
                if run.optimizer.stepped:
                    break
            xs, ys = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])
            ref.step(xs, ys)
            assert torch.allclose(flat(net), flat(ref.model), rtol=1e-5, atol=1e-6), plan
    run.close()
    assert sorted(backend.batches, key=str) == [8, "symbolic"]
    assert SPECIALIZED["L['x']"] == before + 1
    assert "made the batch size of L['x'] (8) a constant" in caplog.text


def test_the_default_ladder_is_one_graph_on_one_process():
    """Without ``micro_batch_sizes`` the rungs start at 2 on one process: warm-up compiles the symbolic graph only,
    every target in the bounds plans on it, and steps on several rungs compile nothing more."""
    from simigrad_compile.config import SimigradConfig
    from simigrad_compile.runtime.ladder import Ladder

    torch._dynamo.reset()
    net = Net()
    backend = CountingSimigrad()
    compiled = torch.compile(net, backend=backend)
    run = sc.AdaptiveBatching(compiled, make_optimizer(net.parameters()), batch_size=2, min_batch_size=1,
                              max_micro_batch_size=8, symbolic_batch=True, group_mode="auto")
    assert run.ladder.rungs == (2, 4, 8)
    assert {run.ladder.plan(t).micro_batch_size for t in range(1, 200)} == {2, 4, 8}
    data = dataset(64)
    run.warm_up(lambda b: loss_of(compiled, *b).backward(), data)
    assert backend.batches == ["symbolic"]
    plans, seen = [Plan(2, 1), Plan(4, 1), Plan(8, 2), Plan(2, 3)], []
    run.plan = plans[0]
    for x, y in run.dataloader(data):
        loss_of(compiled, x, y).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        if run.optimizer.stepped:
            seen.append((run.history[-1]["micro_batch_size"], run.history[-1]["accumulation"]))
            if len(seen) == len(plans):
                break
            run.plan = plans[len(seen)]
    run.close()
    assert seen == [(p.micro_batch_size, p.accumulation) for p in plans]
    assert backend.batches == ["symbolic"]
    assert Ladder(SimigradConfig(symbolic_batch=True, max_micro_batch_size=8), world_size=2).rungs == (1, 2, 4, 8)
