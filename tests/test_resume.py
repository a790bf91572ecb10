"""Checkpoint and resume: a fresh process that loads the checkpoint continues exactly (batch sizes, LR
multipliers, cosines), with the state loaded by ``torch.load(weights_only=True)``."""

import json
import subprocess
import sys

import torch

import simigrad_compile as sc


def setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(150, 5, generator=g)
    ds = torch.utils.data.TensorDataset(x, (3 * x[:, 0]).sin() + 0.5 * torch.randn(150, generator=g))
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = sc.AdaptiveBatching(model, opt, batch_size=8, target_similarity=0.3, min_batch_size=4,
                              max_batch_size=64, max_micro_batch_size=8, group_mode="microsteps", ema=0.5)
    return model, run, run.dataloader(ds, shuffle=True, seed=3)


def train(model, run, loader, steps):
    goal = len(run.history) + steps
    while len(run.history) < goal:
        for x, y in loader:
            torch.nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
            if run.optimizer.stepped and len(run.history) == goal:
                break
    return [(r["batch_size"], r["lr_scale"], r["cosine"]) for r in run.history[goal - steps:]]


def save(path, model, run):
    torch.save({"model": model.state_dict(), "optimizer": run.optimizer.state_dict(), "run": run.state_dict()}, path)


def resume(path):
    model, run, loader = setup()
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.load_state_dict(state["run"])
    return model, run, loader


def test_resume_in_fresh_process_continues_exactly(tmp_path):
    model, run, loader = setup()
    train(model, run, loader, 30)
    ckpt = tmp_path / "ckpt.pt"
    save(ckpt, model, run)
    epoch, position = run.epoch, run.state.position
    expected = train(model, run, loader, 10)
    assert len({b for b, _, _ in expected}) > 1, "the batch size should move in the resumed stretch"
    assert epoch >= 1 and position > 0, "the checkpoint should sit inside an epoch after the first"
    out = subprocess.run([sys.executable, __file__, str(ckpt)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = [tuple(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]
    assert got == expected


if __name__ == "__main__":
    model, run, loader = resume(sys.argv[1])
    assert len(run.history) == 30
    print(json.dumps(train(model, run, loader, 10)))


# --- load_state_dict: atomic, validated, bounds from the new config -------------------------------------------
import copy  # noqa: E402
import re  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402


def _trained():
    model, run, loader = setup()
    train(model, run, loader, 5)
    return run


def _snapshot(run):
    return copy.deepcopy(run.state_dict()), run.plan


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s.pop("history"), "lacks history"),
    (lambda s: s.pop("controller"), "lacks controller"),
    (lambda s: s["controller"].pop("steps"), "lacks steps"),
    (lambda s: s.update(plan=[0, 0]), "plan\\[0\\]"),
    (lambda s: s.update(plan=[8]), "expected \\[micro_batch_size, accumulation\\]"),
    (lambda s: s.update(plan=[3, 2]), "not a size of the ladder"),
    (lambda s: s.update(position=-1), "'position'"),
    (lambda s: s["controller"].update(batch_size=0), "batch size < 1"),
    (lambda s: s["controller"].update(smoothed=float("nan")), "non-finite smoothed"),
    (lambda s: s.update(history="x"), "history"),
])
def test_a_bad_checkpoint_raises_and_leaves_the_run_untouched(corrupt, match):
    donor = _trained()
    state = copy.deepcopy(donor.state_dict())
    corrupt(state)
    model, run, loader = setup()
    train(model, run, loader, 3)
    before, plan = _snapshot(run)
    with pytest.raises((KeyError, ValueError), match=match):
        run.load_state_dict(state)
    assert run.state_dict() == before and run.plan == plan


def test_new_bounds_win_over_the_checkpoint_plan(caplog):
    donor = _trained()
    state = donor.state_dict()
    state["controller"]["batch_size"] = 16
    state["plan"] = [8, 2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=32,
                              target_similarity=0.3, min_batch_size=32, max_batch_size=64, max_micro_batch_size=8,
                              group_mode="microsteps", ema=0.5)
    with caplog.at_level(logging.WARNING, "simigrad_compile"):
        run.load_state_dict(state)
    assert run.plan.batch_size == 32 and run.target_batch_size == 32
    assert "outside the configured bounds [32, 64]" in caplog.text and "target clamped to 32" in caplog.text


def test_a_checkpoint_from_another_ladder_or_world_size_says_what_differs():
    state = _trained().state_dict()
    model, run, _ = setup()
    other = copy.deepcopy(state)
    other["ladder"]["rungs"] = [1, 2, 4, 8, 16]
    now = re.escape(str(run.ladder.rungs))
    with pytest.raises(ValueError, match=rf"rungs \(1, 2, 4, 8, 16\) in the checkpoint, {now} now"):
        run.load_state_dict(other)
    other = copy.deepcopy(state)
    other["ladder"]["world_size"] = 4
    with pytest.raises(ValueError, match="world size 4 in the checkpoint, 1 now"):
        run.load_state_dict(other)


def test_a_cut_plan_off_the_rungs_resumes_with_symbolic_batch():
    """With ``symbolic_batch`` a budget's last step may run any size from 2 to the top rung (``Ladder.cut``), and a
    checkpoint taken before it resumes it; a size above the top rung is still refused."""
    def symbolic_run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        return sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=8,
                                   min_batch_size=4, max_batch_size=64, max_micro_batch_size=8, symbolic_batch=True,
                                   group_mode="microsteps")
    donor = symbolic_run()
    donor.limit_next_step(7)
    assert (donor.plan.micro_batch_size, donor.plan.accumulation) == (7, 1)
    state = copy.deepcopy(donor.state_dict())
    run = symbolic_run()
    run.load_state_dict(state)
    assert run.plan == donor.plan
    state["plan"] = [9, 1]
    with pytest.raises(ValueError, match="not a size of the ladder"):
        symbolic_run().load_state_dict(state)
