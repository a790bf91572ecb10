"""The rules of the loop (issue 7, runtime side), each against the plain fp64 loop of tests/loop_reference.py.

A step must apply exactly what the plain loop applies to the mean gradient of the step's samples (clipped,
unscaled) or nothing at all (non-finite); misuse raises an error that names the cause and the fix.
"""

import copy
import logging
import math

import pytest
import torch

import simigrad_compile as sc
from simigrad_compile.runtime.amp import AmpMisuse
from simigrad_compile.runtime.core import NonFiniteStep
from simigrad_compile.runtime.ladder import Plan
from simigrad_compile.runtime.window import WindowMisuse
from simigrad_compile.stats.gradient_stats import Sink

from simigrad_testkit.loop_reference import (Net, Reference, backward_and_step, dataset, flat, loss_of, make_optimizer,
                                             plain_sgd_steps, train_to_budget)

NAN = float("nan")


def setup(kind="sgd", dtype=torch.float32, scaler=None, **kw):
    torch.manual_seed(0)
    model = Net().to(dtype)
    opts = dict(batch_size=8, max_micro_batch_size=4, group_mode="microsteps", target_similarity=0.3,
                min_batch_size=4, max_batch_size=24)
    opts.update(kw)
    ref = Reference(model, kind, b0=opts["batch_size"])
    run = sc.AdaptiveBatching(model, make_optimizer(model.parameters(), kind), scaler=scaler, **opts)
    sched = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    return model, run, sched, ref


class Feed:
    """A hand-written loop without run.dataloader(): micro-batches of the run's plan, in order."""

    def __init__(self, ds):
        self.x, self.y = ds.tensors
        self.pos = 0

    def take(self, n):
        out = self.x[self.pos:self.pos + n], self.y[self.pos:self.pos + n]
        self.pos += n
        return out


def train_step(model, run, sched, feed, bad=None, clip=None, scaler=None, log_loss=True):
    """One optimizer step of the user's loop; ``bad``: index of a micro-batch whose loss becomes NaN."""
    batches, norms = [], []
    for j in range(run.plan.accumulation):
        x, y = feed.take(run.plan.micro_batch_size)
        batches.append((x, y))
        loss = loss_of(model, x, y)
        if j == bad:
            loss = loss * NAN
        if log_loss:
            run.log_loss(loss)
        norm = backward_and_step(run, loss, scaler, clip)
        if clip:
            norms.append(norm)
        if run.optimizer.stepped:
            sched.step()
    assert run.sync_gradients
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return batches, x, y, norms


def opt_state(run):
    return {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in run.optimizer.state.items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for n in a[k]:
            assert torch.equal(torch.as_tensor(a[k][n]), torch.as_tensor(b[k][n]))


def close(model, ref, tol=1e-5):
    torch.testing.assert_close(flat(model), flat(ref.model), rtol=tol, atol=tol)


# --- non-finite steps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("bad, log_loss", [(0, True), (1, False), (2, True)])
def test_non_finite_loss_or_gradient_skips_the_whole_step(kind, bad, log_loss):
    model, run, sched, ref = setup(kind)
    feed = Feed(dataset(200))
    run.plan = Plan(4, 3)
    _, x, y, _ = train_step(model, run, sched, feed)
    ref.step(x, y)
    close(model, ref)
    params, state, epoch = flat(model).clone(), opt_state(run), sched.last_epoch
    target, controller_steps = run.target_batch_size, run.controller.steps
    run.plan = Plan(4, 3)
    train_step(model, run, sched, feed, bad=bad, log_loss=log_loss)
    reason = "non-finite-loss" if log_loss else "non-finite-gradient"
    rec = run.history[-1]
    assert not rec["stepped"] and rec["skipped"] == reason and rec["batch_size"] == 12
    assert torch.equal(flat(model), params) and sched.last_epoch == epoch
    assert_same_state(opt_state(run), state)
    assert run.skipped_steps[reason] == 1 and run.controller.steps == controller_steps
    assert run.target_batch_size == target and all(p.grad is None for p in model.parameters())
    for _ in range(3):                                   # the run goes on, the same as the plain loop
        _, x, y, _ = train_step(model, run, sched, feed)
        ref.step(x, y)
        close(model, ref)
    assert [r["stepped"] for r in run.history] == [True, False, True, True, True]


def test_on_non_finite_raise_then_discard_goes_on():
    model, run, sched, ref = setup(on_non_finite="raise")
    feed = Feed(dataset(200))
    run.plan = Plan(4, 2)
    with pytest.raises(NonFiniteStep, match="non-finite-loss.*discard_step"):
        train_step(model, run, sched, feed, bad=1)
    with pytest.raises(RuntimeError, match="discard_step"):
        train_step(model, run, sched, feed)
    run.discard_step()
    assert run.state_dict()["steps"] == 0
    for _ in range(3):
        _, x, y, _ = train_step(model, run, sched, feed)
        ref.step(x, y)
        close(model, ref)


def _batch_sink(model):
    return Sink("batch", [[(n, p)] for n, p in model.named_parameters()])


def test_non_finite_statistics_skip_the_step():
    model, run, sched, ref = setup(group_mode="auto")
    sink = _batch_sink(model)
    feed = Feed(dataset(200))
    rows = torch.zeros(len(sink.names), 3)
    rows[0] = torch.tensor([math.inf, 1.0, 1.0])
    run.plan = Plan(8, 1)
    x, y = feed.take(8)
    params = flat(model).clone()
    loss_of(model, x, y).backward()
    sink.add(rows)
    run.optimizer.step()
    rec = run.history[-1]
    assert rec["statistics"] == "batch" and rec["skipped"] == "non-finite-statistics" and not rec["stepped"]
    assert torch.equal(flat(model), params) and not run.optimizer.stepped


# --- AMP -----------------------------------------------------------------------------------------------------
def test_grad_scaler_recipe_unscales_once_and_keeps_the_scale_in_a_window():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    model, run, sched, ref = setup(scaler=scaler)
    feed = Feed(dataset(400))
    expected_scale = 2.0**8
    tracker = 0
    for step in range(6):
        run.plan = Plan(4, 3)
        bad = 1 if step == 3 else None
        scales = []
        for j in range(3):
            x, y = feed.take(4)
            loss = loss_of(model, x, y) * (NAN if j == bad else 1.0)
            scaler.scale(loss).backward()
            scaler.step(run.optimizer)
            scaler.update()
            run.optimizer.zero_grad()
            scales.append(scaler.get_scale())
            if run.optimizer.stepped:
                sched.step()
        xs, ys = feed.x[feed.pos - 12:feed.pos], feed.y[feed.pos - 12:feed.pos]
        ref.step(xs, ys, skip=bad is not None)
        close(model, ref)
        assert scales[0] == scales[1] == expected_scale           # fixed inside the window
        if bad is not None:                                        # one back-off per overflowed step
            expected_scale, tracker = expected_scale * 0.5, 0
            assert run.history[-1]["skipped"] == "amp-overflow" and not run.history[-1]["stepped"]
        else:
            tracker += 1
            if tracker == 2:
                expected_scale, tracker = expected_scale * 2, 0
        assert scales[2] == expected_scale
    assert run.skipped_steps["amp-overflow"] == 1


def test_an_amp_overflow_skips_even_with_on_non_finite_raise():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, run, sched, ref = setup(scaler=scaler, on_non_finite="raise")
    feed = Feed(dataset(100))
    run.plan = Plan(4, 2)
    train_step(model, run, sched, feed, bad=0, scaler=scaler, log_loss=False)
    assert run.history[-1]["skipped"] == "amp-overflow" and scaler.get_scale() == 2.0**7
    _, x, y, _ = train_step(model, run, sched, feed, scaler=scaler)
    ref.step(x, y)
    close(model, ref)


def test_grad_scaler_with_bf16_autocast():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, run, sched, ref = setup(scaler=scaler)
    feed = Feed(dataset(200))
    for _ in range(3):
        run.plan = Plan(4, 3)
        before = flat(model).clone()
        ref_before = flat(ref.model).clone()
        for _ in range(3):
            x, y = feed.take(4)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(model, x, y)
            scaler.scale(loss).backward()
            scaler.step(run.optimizer)
            scaler.update()
            run.optimizer.zero_grad()
        sched.step()
        ref.step(feed.x[feed.pos - 12:feed.pos], feed.y[feed.pos - 12:feed.pos])
        delta, ref_delta = flat(model) - before, flat(ref.model) - ref_before
        assert float((delta - ref_delta).norm() / ref_delta.norm()) < 0.05     # bf16 forward; 3x off without it
        ref.model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})


def test_grad_scaler_misuse_raises_on_the_first_micro_batch():
    model, run, _, _ = setup()
    scaler = torch.amp.GradScaler("cpu")
    x, y = Feed(dataset(8)).take(4)
    scaler.scale(loss_of(model, x, y)).backward()
    with pytest.raises(AmpMisuse, match="scaler=scaler"):
        scaler.step(run.optimizer)
    model, run, _, _ = setup(scaler=torch.amp.GradScaler("cpu"))
    run.amp.scaler.scale(loss_of(model, x, y)).backward()
    with pytest.raises(AmpMisuse, match=r"scaler.step\(run.optimizer\)"):
        run.optimizer.step()
    scaler = torch.amp.GradScaler("cpu")
    model, run, _, _ = setup(scaler=scaler)
    scaler.scale(loss_of(model, x, y)).backward()
    scaler.unscale_(run.optimizer)
    with pytest.raises(AmpMisuse, match="clip_grad_norm_"):
        scaler.step(run.optimizer)


# --- clipping ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("max_norm", [0.05, 100.0])
@pytest.mark.parametrize("amp", [False, True])
def test_clip_grad_norm_clips_the_step_mean_once(norm_type, max_norm, amp):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6) if amp else None
    model, run, sched, ref = setup(scaler=scaler)
    feed = Feed(dataset(200))
    for _ in range(3):
        run.plan = Plan(4, 3)
        ref_norm = None
        start = feed.pos
        xs, ys = feed.x[start:start + 12], feed.y[start:start + 12]
        ref_norm = ref.grad_norm(xs, ys, norm_type)
        _, x, y, norms = train_step(model, run, sched, feed, clip=(max_norm, norm_type), scaler=scaler)
        assert norms[:2] == [None, None]
        assert float(norms[2]) == pytest.approx(ref_norm, rel=1e-5)
        assert run.history[-1]["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
        ref.step(x, y, clip=(max_norm, norm_type))
        close(model, ref)


# --- sync_gradients ------------------------------------------------------------------------------------------
def test_sync_gradients_marks_the_micro_batch_that_ends_a_step():
    model, run, sched, _ = setup()
    seen = []
    for x, y in run.dataloader(dataset(70)):
        before = run.sync_gradients
        loss_of(model, x, y).backward()
        run.optimizer.step()
        seen.append((before, run.sync_gradients, len(run.history)))
        run.optimizer.zero_grad()
    ends = [i for i, (b, a, _) in enumerate(seen) if b]
    assert all(b == a for b, a, _ in seen)
    counts = [n for _, _, n in seen]
    assert [i for i in range(len(counts)) if counts[i] != (counts[i - 1] if i else 0)] == ends
    assert len(ends) == len(run.history) >= 3


# --- misuse inside a window -----------------------------------------------------------------------------------
def _zero_model(model):
    model.zero_grad()


def _grad_none(model):
    model.fc1.weight.grad = None


def _new_tensor(model):
    model.fc2.bias.grad = model.fc2.bias.grad.clone()


def _freeze(model):
    model.fc1.bias.requires_grad_(False)


def test_a_parameter_unfrozen_inside_a_window_is_refused():
    model, run, sched, ref = setup()
    feed = Feed(dataset(200))
    model.fc1.bias.requires_grad_(False)
    ref.model.fc1.bias.requires_grad_(False)
    run.plan = Plan(4, 3)
    loss_of(model, *feed.take(4)).backward()
    run.optimizer.step()
    model.fc1.bias.requires_grad_(True)
    loss_of(model, *feed.take(4)).backward()
    with pytest.raises(WindowMisuse, match="'fc1.bias' joined the step inside an accumulation window"):
        run.optimizer.step()


@pytest.mark.parametrize("misuse, match", [
    (_zero_model, "'fc1.weight' was zeroed or replaced"), (_grad_none, "'fc1.weight' was zeroed or replaced"),
    (_new_tensor, "'fc2.bias' was zeroed or replaced"), (_freeze, "'fc1.bias' stopped requiring grad"),
])
def test_misuse_inside_a_window_raises_then_discard_goes_on(misuse, match):
    model, run, sched, ref = setup()
    feed = Feed(dataset(200))
    run.plan = Plan(4, 3)
    _, x, y, _ = train_step(model, run, sched, feed)
    ref.step(x, y)
    run.plan = Plan(4, 3)
    loss_of(model, *feed.take(4)).backward()
    run.optimizer.step()
    misuse(model)
    loss_of(model, *feed.take(4)).backward()
    with pytest.raises(WindowMisuse, match=match) as err:
        run.optimizer.step()
    assert "run.discard_step()" in str(err.value)
    run.discard_step()
    model.fc1.bias.requires_grad_(True)
    state = run.state_dict()
    assert state["steps"] == 1
    for _ in range(2):
        _, x, y, _ = train_step(model, run, sched, feed)
        ref.step(x, y)
        close(model, ref)


def test_new_step_before_the_last_one_ended_names_the_fix():
    model, run, _, _ = setup()
    ds = dataset(64)
    run.plan = Plan(4, 3)
    it = iter(run.dataloader(ds))
    x, y = next(it)
    loss_of(model, x, y).backward()
    run.optimizer.step()
    with pytest.raises(RuntimeError, match="discard_step"):
        next(iter(run.dataloader(ds)))


def test_discard_save_resume_continues_like_a_run_without_the_abandoned_window(tmp_path):
    ds = dataset(96)

    def fresh():
        return setup(min_batch_size=8, max_batch_size=16)     # micro-batches <= 4: every step accumulates

    def train(model, run, sched, steps):
        goal = len(run.history) + steps
        while len(run.history) < goal:
            for x, y in run.dataloader(ds, shuffle=True, seed=1):
                loss_of(model, x, y).backward()
                run.optimizer.step()
                run.optimizer.zero_grad()
                if run.optimizer.stepped:
                    sched.step()
                if run.sync_gradients and len(run.history) == goal:
                    break
        return flat(model)

    model_a, run_a, sched_a, _ = fresh()
    expected = train(model_a, run_a, sched_a, 8)
    model_b, run_b, sched_b, _ = fresh()
    train(model_b, run_b, sched_b, 3)
    for x, y in run_b.dataloader(ds, shuffle=True, seed=1):   # one micro-step of the 4th step, then abandoned
        loss_of(model_b, x, y).backward()
        run_b.optimizer.step()
        break
    assert run_b.window_open
    with pytest.raises(RuntimeError, match="discard_step"):
        run_b.state_dict()
    run_b.discard_step()
    train(model_b, run_b, sched_b, 1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": run_b.optimizer.state_dict(), "run": run_b.state_dict(),
                "sched": sched_b.state_dict()}, path)
    model_c, run_c, sched_c, _ = fresh()
    state = torch.load(path, weights_only=True)
    model_c.load_state_dict(state["model"])
    run_c.optimizer.load_state_dict(state["opt"])
    run_c.load_state_dict(state["run"])
    sched_c.load_state_dict(state["sched"])
    got = train(model_c, run_c, sched_c, 4)
    assert [r["batch_size"] for r in run_c.history] == [r["batch_size"] for r in run_a.history]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- the live parameter set ----------------------------------------------------------------------------------
def test_parameter_set_is_live():
    torch.manual_seed(0)
    model = Net()
    model.fc1.requires_grad_(False)                      # frozen when the run is built
    ref_model = copy.deepcopy(model)
    run = sc.AdaptiveBatching(model, make_optimizer(model.parameters()), batch_size=8, max_micro_batch_size=4,
                              group_mode="microsteps")
    ref = Reference(ref_model, b0=8)
    sched = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    feed = Feed(dataset(300))

    def both(fn):
        fn(model)
        fn(ref.model)

    both(lambda m: m.fc1.requires_grad_(True))          # the row: unfrozen after AdaptiveBatching(...)
    for change in (None, lambda m: m.fc2.requires_grad_(False), lambda m: m.fc2.requires_grad_(True)):
        if change:
            both(change)
        run.plan = Plan(4, 3)
        _, x, y, _ = train_step(model, run, sched, feed)
        ref.step(x, y)
        close(model, ref)
    shift = torch.nn.Parameter(torch.tensor(0.3))
    model.shift = shift
    ref.model.shift = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    run.optimizer.add_param_group({"params": [shift]})
    ref.opt.add_param_group({"params": [ref.model.shift]})
    for scheduler in (sched, ref.sched):
        scheduler.base_lrs.append(0.1)
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    for _ in range(2):
        run.plan = Plan(4, 3)
        _, x, y, _ = train_step(model, run, sched, feed)
        ref.step(x, y)
        close(model, ref)
        assert float(shift.detach()) == pytest.approx(float(ref.model.shift.detach()), rel=1e-5)
        assert float(shift.detach()) != 0.3


# --- statistics, per step ------------------------------------------------------------------------------------
def test_a_step_without_split_statistics_affects_that_step_only(caplog):
    model, run, sched, _ = setup(group_mode="auto")
    sink = _batch_sink(model)
    feed = Feed(dataset(200))
    rows = torch.zeros(len(sink.names), 3)
    rows[0] = torch.tensor([1.0, 4.0, 1.0])
    with caplog.at_level(logging.WARNING, "simigrad_compile"):
        for record_stats in (True, False, True):
            run.plan = Plan(8, 1)
            x, y = feed.take(8)
            loss_of(model, x, y).backward()
            if record_stats:
                sink.add(rows)
            else:
                sink.mark_unsplit({"fc1.weight": "a micro-batch of 1 sample cannot be halved"})
            run.optimizer.step()
            run.optimizer.zero_grad()
    assert [r["statistics"] for r in run.history] == ["batch", "none", "batch"]
    assert [r["stepped"] for r in run.history] == [True, True, True]
    assert "cannot be halved" in run.history[1]["note"] and run.history[1]["skipped"] == "no-statistics"
    assert run.ladder.min_accumulation == 1 and "this step only" in caplog.text


def test_a_model_that_never_records_batch_statistics_accumulates(caplog):
    model, run, sched, _ = setup(group_mode="auto")
    feed = Feed(dataset(200))
    run.plan = Plan(8, 1)
    with caplog.at_level(logging.WARNING, "simigrad_compile"):
        train_step(model, run, sched, feed)
    assert "no graph compiled with backend='simigrad' holds these parameters" in caplog.text
    assert run.ladder.min_accumulation == 2 and run.plan.accumulation >= 2
    sink = _batch_sink(model)                            # now it records (at accumulation >= 2 it is ignored)
    for _ in range(run.plan.accumulation):
        loss_of(model, *feed.take(run.plan.micro_batch_size)).backward()
        sink.add(torch.ones(len(sink.names), 3))
        run.optimizer.step()
    assert run.history[-1]["statistics"] == "microsteps" and run.ladder.min_accumulation == 1


def test_limit_next_step_cuts_a_budgets_last_step_to_the_same_rung():
    """A sample budget's last step: fewer micro-steps of the same rung, and the update is the plain loop's on
    exactly those samples (fp64 reference: mean gradient of samples 0-15, then of 16-23 with LR x sqrt(8/16))."""
    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net).double()
    data = dataset(40)
    run = sc.AdaptiveBatching(net, torch.optim.SGD(net.parameters(), lr=0.1), batch_size=16, min_batch_size=16,
                              max_batch_size=16, micro_batch_sizes=(4,), group_mode="microsteps")
    assert train_to_budget(run, net, data, 24) == 24
    assert [(r["batch_size"], r["accumulation"], r["micro_batch_size"]) for r in run.history] == [(16, 4, 4), (8, 2, 4)]
    plain_sgd_steps(ref, *data.tensors, [(0, 16), (16, 24)], lr=0.1, b0=16)
    torch.testing.assert_close(flat(net), flat(ref), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="below one micro-batch"):
        run.limit_next_step(3)
