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
    epoch, position = run.epoch, run._position
    expected = train(model, run, loader, 10)
    assert len({b for b, _, _ in expected}) > 1, "the batch size should move in the resumed stretch"
    assert epoch >= 1 and position > 0, "the checkpoint should sit inside an epoch after the first"
    out = subprocess.run([sys.executable, __file__, str(ckpt)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = [tuple(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]
    assert got == expected


if __name__ == "__main__":
    model, run, loader = resume(sys.argv[1])
    assert len(run.history) == 30
    print(json.dumps(train(model, run, loader, 10)))
