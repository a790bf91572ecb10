"""Random runs through the three trainer doors against the fp64 plain loop (tests/simigrad_testkit/door_reference.py).

The hand loop's own property test is tests/test_loop_property.py. Here ``hypothesis`` draws, per door, what its
user can vary (tests/simigrad_testkit/door_actions.py, door_trainers.py):

* ``SIMIGRAD=1`` (the hooks installed in this process): the loop's loader (batch, ``drop_last``, shuffling,
  epochs), its own accumulation of 1 or 2 backward passes per ``step()``, each form of ``zero_grad`` before or
  after, its own clipping of each micro-batch (norm types 2, 1, inf), a scheduler stepped every iteration, a
  ``GradScaler`` with inf losses, NaN samples, freezing a parameter for the first epoch, SGD or Adam, B0 given or
  the loader's.
* Hugging Face (``SimigradTrainer``): ``per_device_train_batch_size``, ``max_steps`` or epochs, random or sequential
  sampling, ``max_grad_norm``, each LR schedule type with warmup, the Trainer's own AdamW (weight decay, its
  no-decay group) or the user's SGD, NaN samples, a frozen parameter, a checkpoint and a resume into a new Trainer.
* Lightning (``SimigradCallback``): the loader (batch, ``drop_last``, shuffling, epochs), ``gradient_clip_val``
  by norm or by value, a step- or epoch-interval scheduler, SGD or Adam, NaN samples, a parameter frozen for the
  first epoch, a checkpoint at an epoch's end and a resumed fit.

Every history record, its loss, gradient norm, LR scale and cosine, and the parameters after every step must be
those of the fp64 plain loop on the samples the door was fed. ``PROPERTY_EXAMPLES`` sets the examples per door of
the long run (100 by default, as in CI's slow step;
``PROPERTY_EXAMPLES=500 pytest --slow tests/test_door_property.py``); the default run draws a few.
"""

import os

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402

from simigrad_testkit import door_actions as actions  # noqa: E402
from simigrad_testkit import door_trainers as trainers  # noqa: E402

LONG = int(os.environ.get("PROPERTY_EXAMPLES", 100))  # per door in CI's slow step
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(door, s):
    """Run one drawn example through ``door`` against the fp64 plain loop; ``hypothesis`` events say what it
    covered (``--hypothesis-show-statistics``)."""
    trace = door(s)
    history = trace.history
    event(f"steps: {min(len(history), 8)}{'+' if len(history) >= 8 else ''}")
    event(f"skipped steps: {any(not r['stepped'] for r in history)}")
    event(f"batch sizes: {len({r['batch_size'] for r in history})}")
    event(f"microsteps cosine checked: {any(r['statistics'] == 'microsteps' for r in history)}")
    event(f"resumed from a checkpoint: {s.get('resume') is not None}")


@settings(max_examples=10, **SETTINGS)
@given(actions.auto_loop_runs())
def test_auto_loop_door(s):
    check(actions.check_auto_loop, s)


@pytest.mark.slow
@settings(max_examples=LONG, **SETTINGS)
@given(actions.auto_loop_runs())
def test_auto_loop_door_long(s):
    check(actions.check_auto_loop, s)


@settings(max_examples=3, **SETTINGS)
@given(trainers.hf_runs())
def test_hf_door(s):
    check(trainers.check_hf, s)


@pytest.mark.slow
@settings(max_examples=LONG, **SETTINGS)
@given(trainers.hf_runs())
def test_hf_door_long(s):
    check(trainers.check_hf, s)


@settings(max_examples=3, **SETTINGS)
@given(trainers.lightning_runs())
def test_lightning_door(s):
    check(trainers.check_lightning, s)


@pytest.mark.slow
@settings(max_examples=LONG, **SETTINGS)
@given(trainers.lightning_runs())
def test_lightning_door_long(s):
    check(trainers.check_lightning, s)
