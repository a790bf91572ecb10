"""AdaptiveBatching end to end: microsteps statistics vs two separate fp64 passes, the optimizer wrapper,
the batch-sink rule, history/CSV/plot, and no recompilation across rung changes."""

import copy
import csv
import logging
import math

import pytest
import torch

import simigrad_compile as sc
from simigrad_compile.runtime.history import CSV_NAME, KEYS
from simigrad_compile.runtime.ladder import Plan
from simigrad_compile.runtime.window import Window
from simigrad_compile.stats.microsteps import MicrostepStats
from simigrad_compile.stats.gradient_stats import Sink


class MLP(torch.nn.Module):
    def __init__(self, d=6, h=12):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)


def data(n, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x.sum(1).sin() + 0.3 * torch.randn(n, generator=g)


def ref_grad(model, x, y):
    """fp64 gradient of the mean loss over (x, y), one separate pass."""
    m = copy.deepcopy(model).double()
    torch.nn.functional.mse_loss(m(x.double()), y.double()).backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def ref_stats(model, x, y, n1):
    g1, g2 = ref_grad(model, x[:n1], y[:n1]), ref_grad(model, x[n1:], y[n1:])
    return float(g1 @ g2), float(g1 @ g1), float(g2 @ g2), float(torch.nn.functional.cosine_similarity(g1, g2, 0))


@pytest.mark.parametrize("sizes, half", [
    ((4, 4), 1), ((3, 3, 3), 1), ((2, 2, 2, 2, 2), 2), ((5, 5, 5, 5), 2), ((8, 8, 5), 1), ((4, 2, 1), 1),
    ((1, 6, 1, 1), 2),
])
def test_microsteps_stats_and_mean_gradient(sizes, half):
    torch.manual_seed(1)
    model = MLP()
    x, y = data(sum(sizes))
    params = list(model.parameters())
    window = Window(sizes, params, MicrostepStats())
    start = 0
    for s in sizes:
        torch.nn.functional.mse_loss(model(x[start:start + s]), y[start:start + s]).backward()
        start += s
        window.micro_step_done()
    stats = window.split_stats()
    window.finish()
    n1 = sum(sizes[:half])
    d, a, b, cos = ref_stats(model, x, y, n1)
    assert (stats.dot, stats.sq_norm_1, stats.sq_norm_2) == pytest.approx((d, a, b), rel=2e-5, abs=1e-7)
    assert stats.cosine == pytest.approx(cos, rel=1e-4, abs=1e-6) and stats.mode == "microsteps"
    full = torch.cat([p.grad.flatten() for p in params]).double()
    torch.testing.assert_close(full, ref_grad(model, x, y), rtol=1e-5, atol=1e-7)


def make_run(model, lr=0.1, **kw):
    opts = dict(batch_size=8, max_micro_batch_size=8, target_similarity=0.5)
    opts.update(kw)
    return sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=lr), **opts)


def test_step_uses_scaled_lr_on_mean_gradient_and_records_reference_cosine():
    torch.manual_seed(2)
    model = MLP()
    run = make_run(model, lr=0.1, batch_size=16, group_mode="microsteps", lr_scaling="linear")
    run.plan = Plan(4, 3)
    before = copy.deepcopy(model)
    seen = []
    x_all, y_all = data(64)
    lrs = []
    run.optimizer.optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    for x, y in run.dataloader(torch.utils.data.TensorDataset(x_all, y_all)):
        torch.nn.functional.mse_loss(model(x), y).backward()
        seen.append((x, y))
        run.optimizer.step()
        if run.optimizer.stepped:
            break
    x, y = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
    rec = run.history[0]
    assert (rec["batch_size"], rec["micro_batch_size"], rec["accumulation"]) == (12, 4, 3)
    assert rec["target_batch_size"] == 16 and rec["lr_scale"] == pytest.approx(12 / 16)
    assert rec["cosine"] == pytest.approx(ref_stats(before, x, y, 4)[3], rel=1e-4)
    assert lrs == [pytest.approx(0.1 * 12 / 16)] and run.optimizer.param_groups[0]["lr"] == 0.1
    g = ref_grad(before, x, y)
    expected = torch.cat([p.detach().flatten() for p in before.parameters()]).double() - 0.1 * 0.75 * g
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in model.parameters()]).double(), expected,
                               rtol=1e-5, atol=1e-6)


def test_zero_grad_is_noop_inside_window_and_scheduler_works():
    model = MLP()
    run = make_run(model, group_mode="microsteps")
    run.plan = Plan(2, 2)
    sched = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0 / (1 + s))
    x, y = data(2)
    torch.nn.functional.mse_loss(model(x), y).backward()
    run.optimizer.step()
    g = model.fc1.weight.grad.clone()
    run.optimizer.zero_grad()
    assert torch.equal(model.fc1.weight.grad, g) and not run.optimizer.stepped
    torch.nn.functional.mse_loss(model(x), y).backward()
    run.optimizer.step()
    assert run.optimizer.stepped
    sched.step()
    run.optimizer.zero_grad()
    assert model.fc1.weight.grad is None
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def _batch_sink(model):
    return Sink("batch", [[(n, p)] for n, p in model.named_parameters()])


def test_batch_sink_used_for_one_microstep_and_ignored_for_accumulation():
    model = MLP()
    sink = _batch_sink(model)
    run = make_run(model, lr=0.0)
    x, y = data(8)
    rows = torch.zeros(len(sink.names), 3)
    rows[0] = torch.tensor([1.0, 4.0, 1.0])                # cos = 1 / (2 * 1) = 0.5
    run.plan = Plan(8, 1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    sink.add(rows)
    run.optimizer.step()
    assert run.history[-1]["cosine"] == pytest.approx(0.5) and run.history[-1]["skipped"] is None
    run.optimizer.zero_grad()
    run.plan = Plan(4, 2)
    before = copy.deepcopy(model)
    for i in range(2):
        torch.nn.functional.mse_loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]).backward()
        sink.add(rows)
        run.optimizer.step()
    assert sink.count == 0
    assert run.history[-1]["cosine"] == pytest.approx(ref_stats(before, x, y, 4)[3], rel=1e-4)


def test_no_statistics_switches_to_microsteps(caplog):
    model = MLP()
    run = make_run(model, batch_size=8)
    x, y = data(8)
    with caplog.at_level(logging.WARNING, "simigrad_compile"):
        torch.nn.functional.mse_loss(model(x), y).backward()
        run.optimizer.step()
    assert "no graph compiled with backend='simigrad' holds these parameters" in caplog.text
    assert run.history[0]["skipped"] == "no-statistics" and run.plan.accumulation >= 2


def test_zero_half_gives_undefined_cosine_but_applies_the_step():
    """A half with a zero gradient: the statistics are finite, the cosine is undefined; the step is applied (the
    gradient is fine) and the controller does not move."""
    model = MLP()
    run = make_run(model, lr=0.1, group_mode="microsteps")
    run.plan = Plan(2, 2)
    x, y = data(4)
    before = copy.deepcopy(model)
    (torch.nn.functional.mse_loss(model(x[:2]), y[:2]) * 0.0).backward()
    run.optimizer.step()
    torch.nn.functional.mse_loss(model(x[2:]), y[2:]).backward()
    run.optimizer.step()
    rec = run.history[0]
    assert rec["stepped"] and rec["skipped"] == "non-finite-cosine" and math.isnan(rec["cosine"])
    assert run.controller.non_finite == 1 and run.target_batch_size == 8 and run.controller.smoothed is None
    g = ref_grad(before, x[2:], y[2:]) * 0.5      # mean over 4 samples, the first two contribute nothing
    expected = torch.cat([p.detach().flatten() for p in before.parameters()]).double() - 0.1 * g * rec["lr_scale"]
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in model.parameters()]).double(), expected,
                               rtol=1e-5, atol=1e-6)


def test_history_csv_plot_and_loss(tmp_path):
    model = MLP()
    run = make_run(model, log_dir=str(tmp_path), group_mode="microsteps")
    x, y = data(100)
    for xb, yb in run.dataloader(torch.utils.data.TensorDataset(x, y), shuffle=True):
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        run.log_loss(loss)
        run.optimizer.step()
        run.optimizer.zero_grad()
    run.close()
    assert all(set(r) == set(KEYS) and r["loss"] is not None for r in run.history)
    # one pass: the 100 samples of epoch 0, its tail completed with the first `position` samples of epoch 1
    assert sum(r["batch_size"] for r in run.history) == 100 + run.state.position == run.history[-1]["samples"]
    assert run.epoch == 1 and 0 <= run.state.position < run.history[-1]["batch_size"]
    with open(tmp_path / CSV_NAME) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(run.history) and [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    pytest.importorskip("matplotlib")
    run.plot(str(tmp_path / "run.png"))
    assert (tmp_path / "run.png").stat().st_size > 1000


class Counting:
    def __init__(self, backend="aot_eager"):
        self.graphs, self.backend = 0, backend

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.backend == "simigrad":
            from simigrad_compile.compile.backend import simigrad_backend

            return simigrad_backend(gm, example_inputs, options={"compiler": "aot_eager"})
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)


def _plans_visiting_every_rung(rungs, n):
    seq = [Plan(m, 1 + i % 3) for i, m in enumerate(list(rungs) + list(reversed(rungs)) * 5)]
    return seq[:n]


def _drive(run, ds, step, plans, **loader_kwargs):
    """One optimizer step per plan, forcing ``run.plan`` before each."""
    run.plan = plans[0]
    for batch in run.dataloader(ds, **loader_kwargs):
        step(batch)
        run.optimizer.step()
        run.optimizer.zero_grad()
        if run.optimizer.stepped:
            if len(run.history) == len(plans):
                break
            run.plan = plans[len(run.history)]


@pytest.mark.parametrize("backend", ["aot_eager", "simigrad"])
@pytest.mark.parametrize("symbolic", [False, True])
def test_no_recompile_after_warmup_across_rung_changes(backend, symbolic):
    """Static rungs: warm-up compiles one graph per rung; symbolic_batch: one graph for all of them."""
    torch._dynamo.reset()
    counting = Counting(backend)
    model = MLP()
    compiled = torch.compile(model, backend=counting)
    limit = torch._dynamo.config.recompile_limit
    mode = "microsteps" if backend == "aot_eager" else "auto"
    run = make_run(compiled, lr=0.01, max_micro_batch_size=16, group_mode=mode, symbolic_batch=symbolic)
    rungs = run.ladder.rungs
    assert torch._dynamo.config.recompile_limit >= len(rungs)
    x, y = data(600)
    ds = torch.utils.data.TensorDataset(x, y)
    run.warm_up(lambda b: torch.nn.functional.mse_loss(compiled(b[0]), b[1]).backward(), ds)
    warm = counting.graphs
    assert warm == (1 if symbolic else len(rungs)) and len(rungs) >= 4
    _drive(run, ds, lambda b: torch.nn.functional.mse_loss(compiled(b[0]), b[1]).backward(),
           _plans_visiting_every_rung(rungs, 24))
    used = [r["micro_batch_size"] for r in run.history]
    assert set(used) == set(rungs) and sum(a != b for a, b in zip(used, used[1:])) >= 20
    assert counting.graphs - warm == 0
    if backend == "simigrad":  # one-micro-step windows took their statistics from the split backward graph
        assert any(r["accumulation"] == 1 and math.isfinite(r["cosine"]) for r in run.history)
    run.close()
    assert torch._dynamo.config.recompile_limit == limit
