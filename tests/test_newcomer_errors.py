"""A newcomer's first mistakes get an error that names the fix (issue 14): the optimizer passed in stepped in place
of ``run.optimizer``, a closure optimizer (LBFGS), and every exception a message tells a user to catch is
importable from ``simigrad_compile``. (The Hugging Face door's uncompiled model: ``tests/test_hf_trainer.py``.)"""

import importlib
import inspect
import pkgutil

import pytest
import torch

import simigrad_compile as sc
from simigrad_testkit.loop_reference import Net, dataset, flat, loss_of, make_optimizer

OPTIONS = dict(batch_size=8, micro_batch_sizes=(4,), group_mode="microsteps", min_batch_size=8, max_batch_size=8)


def _run():
    torch.manual_seed(0)
    model = Net()
    optimizer = make_optimizer(model.parameters())
    return model, optimizer, sc.AdaptiveBatching(model, optimizer, **OPTIONS)


@pytest.mark.parametrize("loader", [True, False], ids=["run.dataloader", "own loader"])
def test_stepping_the_optimizer_passed_in_names_run_optimizer(loader):
    model, optimizer, run = _run()
    before = flat(model)
    data = run.dataloader(dataset(16)) if loader else torch.utils.data.DataLoader(dataset(16), batch_size=4)
    x, y = next(iter(data))
    loss_of(model, x, y).backward()
    with pytest.raises(sc.DirectStepError, match=r"run\.optimizer\.step\(\)") as err:
        optimizer.step()                                   # the mistake: the optimizer, not run.optimizer
    assert "SGD.step()" in str(err.value) and "passed to AdaptiveBatching" in str(err.value)
    torch.testing.assert_close(flat(model), before)        # refused before it changed anything
    run.optimizer.step()                                   # the fix goes on from there
    run.close()
    optimizer.step()                                       # a closed run lets the optimizer be stepped again


def test_the_wrapper_steps_the_optimizer_at_the_boundary_only():
    model, optimizer, run = _run()
    steps = []
    optimizer.register_step_post_hook(lambda *a: steps.append(run.state.micro_step))
    for x, y in run.dataloader(dataset(16)):
        loss_of(model, x, y).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    run.close()
    assert steps == [2, 2] and len(run.history) == 2      # one real step per window of two micro-steps


def test_a_closure_optimizer_is_told_the_fix():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1)
    run = sc.AdaptiveBatching(model, optimizer, **OPTIONS)
    x, y = dataset(4).tensors

    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(sc.ClosureStepError, match="LBFGS") as err:
        run.optimizer.step(closure)
    message = str(err.value)
    assert isinstance(err.value, NotImplementedError)
    assert "loss.backward()" in message and "run.optimizer.step() with no closure" in message
    assert "SGD, Adam or AdamW" in message
    run.close()


INTERNAL = {"Refuse", "NoCut"}
"""Exceptions the split pass raises and catches itself (a refused gradient is logged, never raised to the user)."""


def _package_exceptions():
    found = {}
    for info in pkgutil.walk_packages(sc.__path__, sc.__name__ + "."):
        if ".demo" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__ \
                    and not name.startswith("_") and name not in INTERNAL:
                found[name] = obj
    return found


def test_every_public_exception_is_exported():
    found = _package_exceptions()
    assert {"ConfigError", "NonFiniteStep", "AmpMisuse", "WindowMisuse", "DirectStepError", "ClosureStepError",
            "SplitError"} <= set(found)
    missing = sorted(name for name in found if name not in sc.__all__)
    assert not missing, f"exceptions a user may have to catch but cannot import from simigrad_compile: {missing}"
    for name, cls in found.items():
        assert getattr(sc, name) is cls, name
