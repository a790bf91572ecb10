"""Random sequences of user actions against the plain fp64 loop (tests/simigrad_testkit/loop_reference.py).

Drawn once per example: the door (``loader``: the hand loop through ``run.dataloader()`` and ``run.optimizer``;
``core``: a door's protocol on :class:`StepCore` over the user's own optimizer, ``micro_step_done`` /
``begin_step`` / ``end_step``) and the model (with or without a sparse ``nn.Embedding``). The actions: batch-size
targets (forced plans), steps over a dataset whose epochs end in tails (``loader``), a NaN loss on a random
micro-batch, clipping, freezing and unfreezing, abandoning a window (``discard_step``), save / load / resume into a
fresh run, and an in-place change of a gradient after a random micro-batch's backward (zeroed through the raw
optimizer, scaled, clipped in place). After every step the parameters must equal the reference's and the history
record must say what the reference did; an in-place change inside a step of two or more micro-batches must raise
``WindowMisuse`` (the step is then dropped), and in a step of one it is the plain loop's.

Eager fp64 models, ``microsteps`` statistics. ``PROPERTY_EXAMPLES`` sets the number of examples (default 25);
the long run is the test marked ``slow`` (``PROPERTY_EXAMPLES=500 pytest --slow tests/test_loop_property.py``).
Not ``SIMIGRAD_*``: those are config fields, and an unknown one is an error.
"""

import io
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

import simigrad_compile as sc  # noqa: E402
from simigrad_compile.config import SimigradConfig  # noqa: E402
from simigrad_compile.runtime.core import StepCore  # noqa: E402
from simigrad_compile.runtime.window import WindowMisuse  # noqa: E402

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat, loss_of, make_optimizer, midpoint_halves  # noqa: E402

OPTIONS = dict(batch_size=8, micro_batch_sizes=(2, 4), group_mode="microsteps", target_similarity=0.3,
               min_batch_size=2, max_batch_size=24)
TRAINABLE = ("fc1.weight", "fc1.bias", "fc2.weight")      # fc2.bias always trains: some gradient always exists
DECAY = lambda s: 1.0 / (1 + 0.1 * s)  # noqa: E731
EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", 25))


class SparseNet(Net):
    """``Net`` plus a sparse embedding of a bucket of the first feature."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(6, 1, sparse=True)

    def forward(self, x):
        ids = (x[:, 0].abs() * 2).long().clamp(max=5)
        return super().forward(x) + self.emb(ids).squeeze(-1)


def _zero(model, optimizer):
    optimizer.zero_grad(set_to_none=False)


def _scale(model, optimizer):
    model.fc2.bias.grad.mul_(0.5)


def _clip(model, optimizer):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)


IN_PLACE = {"zero": _zero, "scale": _scale, "clip": _clip}


class LoopMachine(RuleBasedStateMachine):
    @initialize(door=st.sampled_from(["loader", "core"]), sparse=st.booleans())
    def setup(self, door, sparse):
        torch.manual_seed(0)
        self.door, self.sparse = door, sparse
        event(f"door {door}, sparse {sparse}")
        self.ds = dataset(37, dtype=torch.float64)
        self.model = self._model()
        self.ref = Reference(self.model, "sgd", b0=OPTIONS["batch_size"])
        if sparse:  # the plain loop: the same model with a dense embedding gradient, plain SGD
            self.ref.model.emb.sparse = False
            self.ref.opt = torch.optim.SGD(self.ref.model.parameters(), lr=0.1)
            self.ref.sched = torch.optim.lr_scheduler.LambdaLR(self.ref.opt, DECAY)
        self.frozen = set()
        self.pos = 0
        self._build()

    def _model(self):
        return (SparseNet() if self.sparse else Net()).double()

    def _build(self):
        params = self.model.parameters()
        self.opt = torch.optim.SGD(params, lr=0.1) if self.sparse else make_optimizer(params)
        if self.door == "loader":
            self.run = sc.AdaptiveBatching(self.model, self.opt, **OPTIONS)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.run.optimizer, DECAY)
            self.loader = self.run.dataloader(self.ds, shuffle=True, seed=3)
        else:
            self.run = StepCore(self.model, self.opt, SimigradConfig(**OPTIONS))
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, DECAY)
        self.it = None
        self.stepped = False

    def teardown(self):
        if hasattr(self, "run"):
            self.run.close()

    def _next(self):
        if self.door == "core":  # the user's own batches, in order, wrapping around the dataset
            n, (x, y) = self.run.plan.micro_batch_size, self.ds.tensors
            idx = torch.arange(self.pos, self.pos + n) % len(x)
            self.pos += n
            return x[idx], y[idx]
        while True:
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None

    def _micro_step(self, x) -> bool:
        """The door's part after a micro-batch's backward; True when it ended a step."""
        run = self.run
        if self.door == "loader":
            run.optimizer.step()
            run.optimizer.zero_grad()
            self.stepped = run.optimizer.stepped
            return run.sync_gradients
        if not run.micro_step_done(samples=len(x)):
            return False
        self.stepped = run.begin_step()
        if self.stepped:
            self.opt.step()
        run.end_step()
        self.opt.zero_grad(set_to_none=True)
        return True

    def _window_steps(self) -> int:
        """The micro-steps of the step in progress (its window's, else the plan's)."""
        w = self.run.state.window
        return w.accumulation if w is not None else self.run.plan.accumulation

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
        if not self._micro_step(x):
            self.run.discard_step()
            self.it = None                               # a new iteration re-serves the window's samples
        else:                                            # a one-micro-step window: that was a whole step
            self._check([(x, y)], False, None, None)

    def save_and_resume(self):
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                    "run": self.run.state_dict(), "sched": self.sched.state_dict()}, buffer)
        self.run.close()
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        self.model = self._model()
        self.model.load_state_dict(state["model"])
        for name in self.frozen:
            self.model.get_parameter(name).requires_grad_(False)
        self._build()
        self.opt.load_state_dict(state["opt"])
        self.run.load_state_dict(state["run"])
        self.sched.load_state_dict(state["sched"])

    @rule(batch=st.none() | st.integers(2, 24),
          freeze=st.none() | st.tuples(st.sampled_from(TRAINABLE), st.booleans()),
          abandon=st.booleans(),
          nan_at=st.none() | st.integers(0, 5),
          clip=st.none() | st.tuples(st.sampled_from([0.01, 0.2, 100.0]), st.sampled_from([2.0, 1.0, math.inf])),
          in_place=st.none() | st.tuples(st.sampled_from(sorted(IN_PLACE)), st.integers(0, 3)),
          save=st.booleans())
    def user_step(self, batch, freeze, abandon, nan_at, clip, in_place, save):
        """Between steps: a new target, a freeze/unfreeze, an abandoned window; then one step (a NaN loss on
        micro-batch ``nan_at``, clipping, an in-place change after micro-batch ``in_place[1]``); then perhaps save
        and resume into a fresh run."""
        if batch is not None:
            self.set_target(batch)
        if freeze is not None:
            self.freeze(*freeze)
        if abandon:
            self.abandon_a_window()
        if in_place is not None and self.sparse and in_place[0] == "clip":
            in_place = None  # torch.nn.utils.clip_grad_norm_ itself refuses sparse gradients
        self.step(nan_at, clip, in_place)
        if save:
            self.save_and_resume()

    def step(self, nan_at, clip, in_place):
        run, model = self.run, self.model
        batches, norm, changed = [], None, None
        while True:
            x, y = self._next()
            loss = loss_of(model, x, y)
            if nan_at == len(batches):
                loss = loss * float("nan")
            run.log_loss(loss)
            loss.backward()
            if in_place is not None and in_place[1] == len(batches):
                IN_PLACE[in_place[0]](model, self.opt)
                changed = in_place[0]
            if clip:
                norm = run.clip_grad_norm_(*clip)
            batches.append((x, y))
            k = self._window_steps()
            try:
                ended = self._micro_step(x)
            except WindowMisuse as err:
                assert changed is not None and k >= 2, err
                event(f"in-place {changed} caught")
                run.discard_step()
                self.it = None
                return
            assert changed is None or k == 1, "an in-place change inside a step was not caught"
            if ended:
                break
        skip = nan_at is not None and nan_at < len(batches)
        self._check(batches, skip, clip, norm, IN_PLACE[changed] if changed else None)

    def _check(self, batches, skip, clip, norm, change=None):
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        ref = self.ref
        if change is not None:  # one micro-batch: the plain loop applies the changed gradient
            event("in-place change in a one-micro-batch step")
            plain = ref.mean_grad
            ref.mean_grad = lambda a, b: (plain(a, b), change(ref.model, ref.opt))[0]
        try:
            self._check_record(batches, x, y, skip, clip, norm)
            ref.step(x, y, skip=skip, clip=clip)
        finally:
            ref.__dict__.pop("mean_grad", None)
        if self.stepped:
            self.sched.step()

    def _check_record(self, batches, x, y, skip, clip, norm):
        rec = self.run.history[-1]
        assert rec["step"] == len(self.run.history)
        assert (rec["batch_size"], rec["accumulation"], rec["micro_batch_size"]) == (len(x), len(batches),
                                                                                      len(batches[0][0]))
        assert rec["lr_scale"] == pytest.approx(self.ref.lr_scale(len(x)), rel=1e-12)
        assert rec["stepped"] is not skip
        assert (rec["covered_elements"], rec["covered_sq_norm"]) == ((1.0, 1.0) if len(batches) >= 2 else (0.0, 0.0))
        if skip:
            assert rec["skipped"] == "non-finite-loss"
            return
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

    @invariant()
    def parameters_match_the_plain_loop(self):
        if not hasattr(self, "run"):
            return
        torch.testing.assert_close(flat(self.model), flat(self.ref.model), rtol=1e-9, atol=1e-10)
        assert self.sched.last_epoch == self.ref.sched.last_epoch


class Short(LoopMachine):
    pass


Short.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=10, deadline=None)
TestLoopAgainstThePlainLoop = Short.TestCase


class Long(LoopMachine):
    pass


Long.TestCase.settings = settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", 500)), stateful_step_count=10,
                                  deadline=None)
TestLoopAgainstThePlainLoopLong = pytest.mark.slow(Long.TestCase)
