"""In-place changes of a gradient inside a step (issue 19): ``WindowMisuse`` naming the parameter and the fix, or a
step equal to the plain fp64 loop's (tests/simigrad_testkit/loop_reference.py). Legitimate writes (autograd's
accumulation, two backward passes per micro-batch, a parameter no micro-batch reaches, uneven micro-batches that
the window rescales) never raise.
"""

import pytest
import torch

import simigrad_compile as sc
from simigrad_compile.runtime.ladder import Plan
from simigrad_compile.runtime.window import WindowMisuse

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat, loss_of, make_optimizer


def setup(**kw):
    torch.manual_seed(0)
    model = Net()
    opts = dict(batch_size=8, max_micro_batch_size=4, group_mode="microsteps", target_similarity=0.3,
                min_batch_size=4, max_batch_size=24)
    opts.update(kw)
    ref = Reference(model, "sgd", b0=opts["batch_size"])
    raw = make_optimizer(model.parameters(), "sgd")
    run = sc.AdaptiveBatching(model, raw, **opts)
    sched = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    return model, raw, run, sched, ref


def step(model, run, sched, data, pos, sizes, action=None, at=1):
    """One step of the hand loop over micro-batches of ``sizes``; ``action(model)`` runs after micro-batch ``at``'s
    backward. Returns the step's samples and the next position."""
    x, y = data.tensors
    for j, n in enumerate(sizes):
        xb, yb = x[pos:pos + n], y[pos:pos + n]
        pos += n
        run.next_micro_batch(n)
        loss_of(model, xb, yb).backward()
        if action is not None and j == at:
            action(model)
        run.optimizer.step()
        run.optimizer.zero_grad()
        if run.optimizer.stepped:
            sched.step()
    n = sum(sizes)
    return (x[pos - n:pos], y[pos - n:pos]), pos


def close(model, ref, tol=1e-5):
    torch.testing.assert_close(flat(model), flat(ref.model), rtol=tol, atol=tol)


RAW = {}


def _raw_zero(model):
    RAW["opt"].zero_grad(set_to_none=False)


def _model_zero(model):
    model.zero_grad(set_to_none=False)


def _grad_zero(model):
    model.fc2.weight.grad.zero_()


def _grad_scale(model):
    model.fc1.bias.grad.mul_(0.5)


def _grad_write(model):
    model.fc2.bias.grad.copy_(torch.ones_like(model.fc2.bias.grad))


def _clip(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)


CASES = [(_raw_zero, "'fc1.weight'"), (_model_zero, "'fc1.weight'"), (_grad_zero, "'fc2.weight'"),
         (_grad_scale, "'fc1.bias'"), (_grad_write, "'fc2.bias'"), (_clip, "'fc1.weight'")]


@pytest.mark.parametrize("at", [0, 1, 2])
@pytest.mark.parametrize("action, name", CASES, ids=[c[0].__name__ for c in CASES])
def test_an_in_place_change_inside_a_step_raises_then_the_run_goes_on(action, name, at):
    model, raw, run, sched, ref = setup()
    RAW["opt"] = raw
    data, pos = dataset(200), 0
    run.plan = Plan(4, 3)
    (x, y), pos = step(model, run, sched, data, pos, [4, 4, 4])
    ref.step(x, y)
    close(model, ref)
    run.plan = Plan(4, 3)
    with pytest.raises(WindowMisuse, match=f"{name} was changed in place") as err:
        step(model, run, sched, data, pos, [4, 4, 4], action=action, at=at)
    msg = str(err.value)
    assert "run.optimizer.zero_grad()" in msg and "run.clip_grad_norm_" in msg and "run.discard_step()" in msg
    run.discard_step()
    pos += 4 * (at + 1)  # the micro-batches the failed step consumed
    for _ in range(2):
        run.plan = Plan(4, 3)
        (x, y), pos = step(model, run, sched, data, pos, [4, 4, 4])
        ref.step(x, y)
        close(model, ref)
    assert [r["stepped"] for r in run.history] == [True, True, True]


@pytest.mark.parametrize("action", [_raw_zero, _clip, _grad_scale], ids=lambda f: f.__name__)
def test_one_micro_step_per_step_an_in_place_change_is_the_plain_loops(action):
    """With one micro-batch per step the loop's gradient is the step's: zeroing before nothing, clipping it, is
    what the plain loop does (no error)."""
    model, raw, run, sched, ref = setup(group_mode="microsteps")
    RAW["opt"] = raw
    data, pos = dataset(200), 0
    for _ in range(2):
        run.plan = Plan(4, 1)
        (x, y), pos = step(model, run, sched, data, pos, [4], action=action, at=0)
        ref.mean_grad(x, y)
        (_model_zero if action is _raw_zero else action)(ref.model)
        grads = [p.grad.clone() for p in ref.model.parameters()]
        ref.model.zero_grad(set_to_none=True)
        # the reference step on the changed gradient: the plain loop's optimizer, LR scaled as the run's
        scale = ref.lr_scale(len(x))
        for p, g in zip(ref.model.parameters(), grads):
            p.grad = g
        lrs = [g["lr"] for g in ref.opt.param_groups]
        for g in ref.opt.param_groups:
            g["lr"] *= scale
        ref.opt.step()
        for g, lr in zip(ref.opt.param_groups, lrs):
            g["lr"] = lr
        ref.sched.step()
        ref.model.zero_grad(set_to_none=True)
        close(model, ref)


def test_legitimate_writes_do_not_raise_and_the_step_is_the_plain_loops():
    """Two backward passes per micro-batch, a parameter that one micro-batch does not reach, uneven micro-batches
    (the window rescales the running sum in place) and a one-sample tail: no error, the plain loop's step."""
    model, raw, run, sched, ref = setup()
    data, pos = dataset(200), 0
    x_all, y_all = data.tensors
    model.shift = torch.nn.Parameter(torch.zeros(()))
    ref.model.shift = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    run.user_optimizer.add_param_group({"params": [model.shift]})
    ref.opt.add_param_group({"params": [ref.model.shift]})
    for sizes in ([4, 4, 4], [3, 4, 2], [4, 1]):
        run.plan = Plan(4, len(sizes))
        n = sum(sizes)
        xs, ys = x_all[pos:pos + n], y_all[pos:pos + n]
        off = 0
        for j, m in enumerate(sizes):
            xb, yb = xs[off:off + m], ys[off:off + m]
            off += m
            run.next_micro_batch(m)
            shift, model.shift = model.shift, (model.shift if j != 1 else None)  # micro-batch 2 skips `shift`
            half = m // 2
            if half:  # two backward passes, one per part of the micro-batch: their sum is the micro-batch's
                (loss_of(model, xb[:half], yb[:half]) * half / m).backward()
                (loss_of(model, xb[half:], yb[half:]) * (m - half) / m).backward()
            else:
                loss_of(model, xb, yb).backward()
            model.shift = shift
            run.optimizer.step()
            run.optimizer.zero_grad()
        pos += n
        # the reference: the same samples, micro-batch 2 without `shift` (its gradient there is the others')
        ref.model.zero_grad(set_to_none=True)
        off = 0
        for j, m in enumerate(sizes):
            xb, yb = xs[off:off + m].double(), ys[off:off + m].double()
            off += m
            shift, ref.model.shift = ref.model.shift, (ref.model.shift if j != 1 else None)
            (loss_of(ref.model, xb, yb) * m / n).backward()
            ref.model.shift = shift
        scale = ref.lr_scale(n)
        for g in ref.opt.param_groups:
            g["lr"] *= scale
        ref.opt.step()
        for g in ref.opt.param_groups:
            g["lr"] /= scale
        ref.model.zero_grad(set_to_none=True)
        torch.testing.assert_close(torch.cat([flat(model), model.shift.detach().double().reshape(1)]),
                                   torch.cat([flat(ref.model), ref.model.shift.detach().reshape(1)]),
                                   rtol=1e-5, atol=1e-5)
    assert all(r["stepped"] for r in run.history)
