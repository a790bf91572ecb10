"""What the property test through the doors (tests/test_door_property.py) found, one named example each, checked
against the fp64 plain loop as there (tests/simigrad_testkit/door_reference.py)."""

import pytest

from simigrad_testkit import door_actions as actions

LOOP = dict(n=5, micro=2, seed=0, b0=2, target=-1.0, max_batch=4, nan=[], opt="sgd", frozen=None, epochs=1,
            drop_last=False, shuffle=False, accumulate=1, zero="none", sched=False, clip=None, scaler=False, growth=1,
            inf=[], sized=False)
"""An unmodified loop under ``SIMIGRAD=1``: 5 samples in loader batches of 2, two micro-steps per step."""


def test_auto_loop_a_window_cut_at_the_epoch_end_steps_with_its_last_step_calls_lr():
    """The loop steps its scheduler after every ``step()``; the epoch's last window (4 + 1 samples) is cut when the
    loader runs out, after the scheduler stepped once more. That step takes the LR of its last micro-batch's
    ``step()``, as a window ended by the plan does (it took the next one)."""
    trace = actions.check_auto_loop(dict(LOOP, sched=True))
    assert [r["batch_size"] for r in trace.history] == [4, 1]
    assert [m.factor for m in trace.micro] == [actions.DECAY(i) for i in range(3)]


def test_auto_loop_the_loops_own_clipping_of_each_micro_batch_is_its_own():
    """``clip_grad_norm_`` before each ``step()`` clips that micro-batch's gradient (docs/doors.md); on a window's
    first micro-step it raised ``WindowMisuse`` (an in-place change of the window's gradient)."""
    trace = actions.check_auto_loop(dict(LOOP, clip=(0.01, 2.0)))
    assert trace.history[0]["accumulation"] == 2


def test_auto_loop_a_grad_scaler_drop_before_the_epoch_end_is_not_a_window_misuse():
    """A ``GradScaler`` drops the epoch's last micro-batch (sample 6 is NaN) inside a window of one micro-step:
    its backward accumulated into a fresh gradient the door drops, not into the window's, and the window cut at
    the epoch's end is a step of its one micro-batch (it raised ``WindowMisuse`` at the boundary)."""
    trace = actions.check_auto_loop(dict(LOOP, n=7, nan=[6], scaler=True))
    assert [r["batch_size"] for r in trace.history] == [4, 2]


def test_lightning_a_skipped_step_with_clipping_by_value_is_not_clipped():
    """A NaN sample skips its step, whose gradients the core drops; Lightning's ``clip_grad_value_`` of no gradient
    raised inside torch. The skipped step is not clipped, and the next one is."""
    pytest.importorskip("lightning")
    from simigrad_testkit import door_trainers as trainers

    s = dict(LOOP, nan=[0], sched=None, clip=(0.01, "value"), resume=None, epochs=2)
    trace = trainers.check_lightning(s)
    assert [r["stepped"] for r in trace.history] == [False, True, False, True]


def test_lightning_a_skipped_last_step_of_an_epoch_keeps_the_epoch_schedulers_lr():
    """The epoch's last micro-batch (sample 4, NaN) is a skipped step; Lightning then steps the epoch-interval
    scheduler on the same batch. Holding the step-interval schedulers put the optimizer's LR back to the one before,
    so the next epoch trained at the first epoch's LR while the scheduler had moved on."""
    pytest.importorskip("lightning")
    from simigrad_testkit import door_trainers as trainers

    s = dict(LOOP, nan=[4], sched="epoch", clip=None, resume=None, epochs=2)
    trace = trainers.check_lightning(s)
    assert [r["stepped"] for r in trace.history] == [True, False, True, False]
