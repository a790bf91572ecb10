"""Why the boundary reduces every gradient itself: finite split statistics do not prove a finite gradient.

The statistics of a compiled backward see only what that backward computed. A parameter that is also used
outside the compiled graph, or a gradient hook, can make ``p.grad`` non-finite while ``(d, a, b)`` stay finite.
Each case: the statistics are finite (read independently with ``gradient_stats``), and the step is still
skipped as ``non-finite-gradient`` with the parameters and the optimizer untouched, as the plain loop's
``GradScaler``-style rule asks. A rule that trusted the statistics would step on NaN here.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import simigrad_compile as sc
from simigrad_compile.stats.gradient_stats import gradient_stats

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat


def _run(model):
    opts = dict(batch_size=8, min_batch_size=8, max_batch_size=8, max_micro_batch_size=8, group_mode="auto")
    return sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.1), **opts)


def _nan_from_outside(model, compiled, loss):
    """Adds 0 to the loss through an eager use of fc1.weight whose gradient is NaN (sqrt at 0)."""
    w = model.fc1.weight
    return loss + torch.sqrt((w - w.detach()).abs().sum())


def _nan_from_hook(model, compiled, loss):
    model.fc2.bias.register_hook(lambda g: g * math.nan)
    return loss


@pytest.mark.parametrize("poison", [_nan_from_outside, _nan_from_hook])
def test_finite_statistics_with_a_non_finite_gradient_still_skip_the_step(poison):
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager"})
    x, y = dataset(8).tensors
    with _run(compiled) as run:
        loss = poison(model, compiled, F.mse_loss(compiled(x), y))
        assert math.isfinite(loss.item())
        loss.backward()
        assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
        stats = gradient_stats(compiled)                      # not reset: the run reads the same rows
        assert stats.mode == "batch" and stats.finite and not stats.reason
        params, state = flat(model).clone(), dict(run.optimizer.state)
        run.log_loss(loss)
        run.optimizer.step()
        rec = run.history[-1]
        assert rec["statistics"] == "batch" and not rec["stepped"] and rec["skipped"] == "non-finite-gradient"
        assert torch.equal(flat(model), params) and dict(run.optimizer.state) == state
        assert all(p.grad is None for p in model.parameters())


def _microsteps_run(model):
    opts = dict(batch_size=8, min_batch_size=8, max_batch_size=8, max_micro_batch_size=4, group_mode="microsteps")
    return sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.1), **opts)


def test_microsteps_boundary_norm_and_skip_come_from_the_gradient_itself():
    """A small model's ``microsteps`` window takes ``|p.grad|^2`` in its statistics pass (no ``_foreach_norm``):
    the history's norm is still the mean gradient's (against one fp64 backward over all samples), and a NaN
    gradient in one parameter (a hook, the loss finite) still skips the step."""
    torch.manual_seed(0)
    model = Net()
    ref = Reference(model, "sgd", b0=8)
    x, y = dataset(16).tensors
    with _microsteps_run(model) as run:
        assert run.plan.accumulation == 2
        for j in range(2):
            loss = F.mse_loss(model(x[4 * j:4 * j + 4]), y[4 * j:4 * j + 4])
            run.log_loss(loss)
            loss.backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
        rec = run.history[-1]
        assert rec["statistics"] == "microsteps" and rec["stepped"]
        assert rec["grad_norm"] == pytest.approx(ref.grad_norm(x[:8].double(), y[:8].double(), 2.0), rel=1e-6)
        params = flat(model).clone()
        for j in range(2):
            if j == 1:
                model.fc2.bias.register_hook(lambda g: g * math.nan)
            loss = F.mse_loss(model(x[8 + 4 * j:12 + 4 * j]), y[8 + 4 * j:12 + 4 * j])
            run.log_loss(loss)
            loss.backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
        rec = run.history[-1]
        assert not rec["stepped"] and rec["skipped"] == "non-finite-gradient"
        assert torch.equal(flat(model), params)
