"""Random sequences of user actions against the plain fp64 loop (tests/loop_reference.py).

The actions: batch-size targets (forced plans), steps through ``run.dataloader()`` over a dataset whose epochs end
in tails and short micro-batches, a NaN loss on a random micro-batch, clipping, freezing and unfreezing,
abandoning a window (``discard_step``), and save / load / resume into a fresh run at random points. After every
step the parameters must equal the reference's and the history record must say what the reference did.

Eager fp64 models, ``microsteps`` statistics. ``PROPERTY_EXAMPLES`` sets the number of examples
(default 25 for CI; the issue's long run is 500). Not ``SIMIGRAD_*``: those are config fields, and an unknown
one is an error.
"""

import io
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

import simigrad_compile as sc  # noqa: E402

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat, loss_of, make_optimizer, midpoint_halves  # noqa: E402

OPTIONS = dict(batch_size=8, micro_batch_sizes=(2, 4), group_mode="microsteps", target_similarity=0.3,
               min_batch_size=2, max_batch_size=24)
TRAINABLE = ("fc1.weight", "fc1.bias", "fc2.weight")      # fc2.bias always trains: some gradient always exists
DECAY = lambda s: 1.0 / (1 + 0.1 * s)  # noqa: E731


class LoopMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ds = dataset(37, dtype=torch.float64)
        self.model = Net().double()
        self.ref = Reference(self.model, "sgd", b0=OPTIONS["batch_size"])
        self.frozen = set()
        self._build()

    def _build(self):
        self.run = sc.AdaptiveBatching(self.model, make_optimizer(self.model.parameters()), **OPTIONS)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.run.optimizer, DECAY)
        self.loader = self.run.dataloader(self.ds, shuffle=True, seed=3)
        self.it = None

    def teardown(self):
        self.run.close()

    def _next(self):
        while True:
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None

    # --- actions -------------------------------------------------------------------------------------------
    def set_target(self, batch):
        self.run.controller.batch_size = batch
        self.run.plan = self.run.ladder.plan(batch)

    def freeze(self, name, frozen):
        for model in (self.model, self.ref.model):
            model.get_parameter(name).requires_grad_(not frozen)
        (self.frozen.add if frozen else self.frozen.discard)(name)

    def abandon_a_window(self):
        x, y = self._next()
        loss = loss_of(self.model, x, y)
        self.run.log_loss(loss)
        loss.backward()
        self.run.optimizer.step()
        self.run.optimizer.zero_grad()
        if self.run.window_open:
            self.run.discard_step()
            self.it = None                               # a new iteration re-serves the window's samples
        else:                                            # a one-micro-step window: that was a whole step
            self._check([(x, y)], False, None, None)

    def save_and_resume(self):
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.run.optimizer.state_dict(),
                    "run": self.run.state_dict(), "sched": self.sched.state_dict()}, buffer)
        self.run.close()
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        self.model = Net().double()
        self.model.load_state_dict(state["model"])
        for name in self.frozen:
            self.model.get_parameter(name).requires_grad_(False)
        self._build()
        self.run.optimizer.load_state_dict(state["opt"])
        self.run.load_state_dict(state["run"])
        self.sched.load_state_dict(state["sched"])

    @rule(batch=st.none() | st.integers(2, 24),
          freeze=st.none() | st.tuples(st.sampled_from(TRAINABLE), st.booleans()),
          abandon=st.booleans(),
          nan_at=st.none() | st.integers(0, 5),
          clip=st.none() | st.tuples(st.sampled_from([0.01, 0.2, 100.0]), st.sampled_from([2.0, 1.0, math.inf])),
          save=st.booleans())
    def user_step(self, batch, freeze, abandon, nan_at, clip, save):
        """Between steps: a new target, a freeze/unfreeze, an abandoned window; then one step (a NaN loss on
        micro-batch ``nan_at``, clipping); then perhaps save and resume into a fresh run."""
        if batch is not None:
            self.set_target(batch)
        if freeze is not None:
            self.freeze(*freeze)
        if abandon:
            self.abandon_a_window()
        self.step(nan_at, clip)
        if save:
            self.save_and_resume()

    def step(self, nan_at, clip):
        run, model = self.run, self.model
        batches, norm = [], None
        while True:
            x, y = self._next()
            loss = loss_of(model, x, y)
            if nan_at == len(batches):
                loss = loss * float("nan")
            run.log_loss(loss)
            loss.backward()
            if clip:
                norm = run.clip_grad_norm_(*clip)
            run.optimizer.step()
            run.optimizer.zero_grad()
            batches.append((x, y))
            if run.sync_gradients:
                break
        self._check(batches, nan_at is not None and nan_at < len(batches), clip, norm)

    def _check(self, batches, skip, clip, norm):
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        rec = self.run.history[-1]
        assert rec["step"] == len(self.run.history)
        assert (rec["batch_size"], rec["accumulation"], rec["micro_batch_size"]) == (len(x), len(batches),
                                                                                      len(batches[0][0]))
        assert rec["lr_scale"] == pytest.approx(self.ref.lr_scale(len(x)), rel=1e-12)
        assert rec["stepped"] is not skip
        if skip:
            assert rec["skipped"] == "non-finite-loss"
        else:
            assert rec["loss"] == pytest.approx(float(loss_of(self.ref.model, x, y).detach()), rel=1e-9)
            norm_type = clip[1] if clip else 2.0
            ref_norm = self.ref.grad_norm(x, y, norm_type)
            assert rec["grad_norm"] == pytest.approx(ref_norm, rel=1e-9)
            if clip:
                assert float(norm) == pytest.approx(ref_norm, rel=1e-9)
            if len(batches) >= 2:
                assert rec["statistics"] == "microsteps"
                assert rec["cosine"] == pytest.approx(self.ref.cosine(midpoint_halves(batches)), rel=1e-7, abs=1e-9)
            else:
                assert rec["statistics"] == "none" and rec["skipped"] == "no-statistics"
        self.ref.step(x, y, skip=skip, clip=clip)
        if self.run.optimizer.stepped:
            self.sched.step()

    @invariant()
    def parameters_match_the_plain_loop(self):
        torch.testing.assert_close(flat(self.model), flat(self.ref.model), rtol=1e-9, atol=1e-10)
        assert self.sched.last_epoch == self.ref.sched.last_epoch


LoopMachine.TestCase.settings = settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", 25)),
                                         stateful_step_count=10, deadline=None)
TestLoopAgainstThePlainLoop = LoopMachine.TestCase
