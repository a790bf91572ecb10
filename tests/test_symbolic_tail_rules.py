"""Epoch tails of any size (``symbolic_batch``: one graph runs every micro-batch size from 2 up) under the loop's
rules: AMP's ``GradScaler``, a non-finite step, clipping, Adam's state. Each step against the plain fp64 loop of
``simigrad_testkit.loop_reference`` over exactly that step's samples, in the order the run's loader gave them.

The runtime weighs micro-batches of unequal size by their samples; a wrong weight, a skipped step that still moves
the optimizer or a clip of the wrong gradient shows here as a parameter off the reference.
"""

import pytest
import torch

import simigrad_compile as sc

from simigrad_testkit.loop_reference import Net, Reference, backward_and_step, dataset, flat, loss_of, make_optimizer

NAN = float("nan")
N = 31  # batch 8 = 4 x 2: three steps, then the epoch's last 7 samples as micro-batches of 4 and 3


def lr_lambda(s):
    return 1.0 / (1 + 0.1 * s)  # the reference's schedule


def train(kind: str, amp: bool, clip, poison):
    """Three passes of the user's loop; ``poison``: ``(step, micro-batch)`` whose loss becomes NaN. Returns the
    model, the run, the reference and each step's ``(sample ids, stepped, skipped)`` (``skipped``: why the step
    did not steer the batch size; a tail is a ``short-step``, which does update)."""
    torch.manual_seed(0)
    model = Net()
    ref = Reference(model, kind, b0=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
    run = sc.AdaptiveBatching(model, make_optimizer(model.parameters(), kind), scaler=scaler, batch_size=8,
                              min_batch_size=8, max_batch_size=8, max_micro_batch_size=4, group_mode="microsteps",
                              symbolic_batch=True)
    sched = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_lambda)
    x_all, y_all = dataset(N).tensors
    loader = run.dataloader(torch.utils.data.TensorDataset(torch.arange(N), x_all, y_all), shuffle=True, seed=1)
    steps, ids, micro = [], [], 0
    for _ in range(3):
        for i, x, y in loader:
            loss = loss_of(model, x, y)
            if (len(steps), micro) == poison:
                loss = loss * NAN
            ids += i.tolist()
            backward_and_step(run, loss, scaler, clip)
            micro += 1
            if run.sync_gradients:
                steps.append((ids, run.history[-1]["stepped"], run.history[-1]["skipped"]))
                if run.optimizer.stepped:
                    sched.step()
                ids, micro = [], 0
    return model, run, ref, steps


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("clip", [None, (0.05, 2.0)])
def test_tails_of_any_size_step_as_the_plain_loop(kind, amp, clip):
    poison = (3, 1)  # the first epoch's tail step, its micro-batch of 3
    model, run, ref, steps = train(kind, amp, clip, poison)
    x_all, y_all = dataset(N).tensors
    sizes = [(r["batch_size"], r["accumulation"]) for r in run.history]
    assert sizes[3] == (7, 2) and sizes.count((7, 2)) == 3 and len(steps) == 12  # every tail: 7 exactly
    assert all(sorted(sum((s[0] for s in steps[e * 4:e * 4 + 4]), [])) == list(range(N)) for e in range(3))
    reason = "amp-overflow" if amp else "non-finite-gradient"
    assert [skipped for _, _, skipped in steps] == [None] * 3 + [reason] + ([None] * 3 + ["short-step"]) * 2
    for ids, stepped, _ in steps:
        ref.step(x_all[ids], y_all[ids], skip=not stepped, clip=clip)
    torch.testing.assert_close(flat(model), flat(ref.model), rtol=1e-5, atol=1e-6)
    run.close()


def test_a_poisoned_tail_moves_nothing_and_the_next_epoch_goes_on():
    """The skipped tail step does not count as one of Adam's steps (11 of 12), and the next epoch's steps update
    again (the parameters themselves are checked against the fp64 loop above)."""
    model, run, _, steps = train("adam", True, None, poison=(3, 0))
    assert [s[1] for s in steps] == [True] * 3 + [False] + [True] * 8
    assert run.skipped_steps["amp-overflow"] == 1 and run.optimizer.optimizer.state[model.fc1.weight]["step"] == 11
    run.close()


def test_the_reference_tells_a_wrong_weighing_of_the_tail():
    """Weighing the tail's micro-batches of 4 and 3 equally (the mean of their means) instead of by their samples
    moves the parameters far outside the tolerance above: the comparison can fail."""
    model, run, ref, steps = train("sgd", False, None, poison=None)
    x_all, y_all = dataset(N).tensors
    for ids, stepped, _ in steps:
        if len(ids) != 7:
            ref.step(x_all[ids], y_all[ids], skip=not stepped)
            continue
        halves = [ref.mean_grad(x_all[part], y_all[part]) for part in (ids[:4], ids[4:])]
        ref.apply([(a + b) / 2 for a, b in zip(*halves)], 7)
        ref.sched.step()
    assert (flat(model) - flat(ref.model)).abs().max() > 1e-3
    run.close()
