"""The step core driven through its door protocol (micro_step_done / begin_step / end_step), the way a door
that does not own the loop drives it: the user's plain loop calls ``optimizer.step()`` and ``zero_grad()`` on
every micro-batch, and step pre/post hooks on the user's optimizer carry the protocol. Checked against the
plain fp64 loop over the same samples, with a short last batch (``next_micro_batch``) and a window cut short by
the end of the data (``end_window``)."""

import pytest
import torch

from simigrad_compile.config import SimigradConfig
from simigrad_compile.runtime.core import StepCore
from simigrad_compile.runtime.window import optimizer_params

from simigrad_testkit.loop_reference import Net, Reference, dataset, flat, loss_of, make_optimizer


class HookDoor:
    """Step hooks on the user's optimizer. Between micro-steps the window's gradients wait outside ``p.grad``
    (so the user's ``optimizer.step()`` and ``zero_grad()`` act on nothing); before each micro-step is counted
    the fresh gradient is folded back into them in place, so ``p.grad`` stays the tensor the window tracks."""

    def __init__(self, core: StepCore, optimizer):
        self.core, self.optimizer = core, optimizer
        self.waiting, self.boundary, self.closing = {}, False, False
        optimizer.register_step_pre_hook(self.pre)
        optimizer.register_step_post_hook(self.post)

    def fold(self):
        for p in optimizer_params(self.optimizer):
            held = self.waiting.pop(p, None)
            if held is not None:
                if p.grad is not None:
                    held.add_(p.grad)
                p.grad = held

    def pre(self, optimizer, args, kwargs):
        if self.closing:
            return
        self.fold()
        if self.core.micro_step_done():
            self.boundary = True
            self.core.begin_step()           # False: gradients dropped, the optimizer's step changes nothing
            return
        for p in optimizer_params(optimizer):
            if p.grad is not None:
                self.waiting[p], p.grad = p.grad, None

    def post(self, optimizer, args, kwargs):
        if self.boundary:
            self.boundary = False
            self.core.end_step()

    def end_of_data(self):
        self.fold()
        if self.core.end_window():
            self.closing = True
            if self.core.begin_step():
                self.optimizer.step()
            self.core.end_step()
            self.closing = False


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_hook_door_matches_the_plain_loop(kind):
    torch.manual_seed(0)
    model = Net()
    ref = Reference(model, kind, b0=8, schedule=False)
    optimizer = make_optimizer(model.parameters(), kind)
    config = SimigradConfig(batch_size=8, micro_batch_sizes=(4,), group_mode="microsteps", target_similarity=0.3,
                            min_batch_size=8, max_batch_size=24)
    core = StepCore(model, optimizer, config)
    door = HookDoor(core, optimizer)
    ds = dataset(43)                                        # batches of 4, the last one of 3
    for x, y in torch.utils.data.DataLoader(ds, batch_size=4):
        core.next_micro_batch(len(x))                       # a door that hooks the loader knows the size
        optimizer.zero_grad()                               # the plain loop's own zero_grad, every batch
        loss = loss_of(model, x, y)
        core.log_loss(loss)
        loss.backward()
        optimizer.step()
    door.end_of_data()
    xs, ys = ds.tensors
    start = 0
    assert sum(r["batch_size"] for r in core.history) == 43
    for rec in core.history:
        n = rec["batch_size"]
        ref.step(xs[start:start + n], ys[start:start + n])
        assert rec["lr_scale"] == pytest.approx(ref.lr_scale(n)) and rec["stepped"]
        start += n
    assert len({r["batch_size"] for r in core.history}) > 1
    torch.testing.assert_close(flat(model), flat(ref.model), rtol=1e-5, atol=1e-5)


def test_protocol_misuse_is_named():
    torch.manual_seed(0)
    model = Net()
    core = StepCore(model, make_optimizer(model.parameters()),
                    SimigradConfig(batch_size=4, max_micro_batch_size=2, group_mode="microsteps"))
    with pytest.raises(RuntimeError, match="begin_step\\(\\) needs a window"):
        core.begin_step()
    with pytest.raises(RuntimeError, match="end_step\\(\\) without begin_step"):
        core.end_step()
    x, y = dataset(8).tensors
    loss_of(model, x[:2], y[:2]).backward()
    assert not core.micro_step_done(samples=2)
    loss_of(model, x[2:5], y[2:5]).backward()
    with pytest.raises(RuntimeError, match="next_micro_batch"):
        core.micro_step_done(samples=3)
