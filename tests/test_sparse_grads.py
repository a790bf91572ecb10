"""Sparse gradients (``nn.Embedding(sparse=True)``, issue 19): the microsteps statistics are those of two fp64
half-batch passes and every step is the plain fp64 loop's, never a crash inside the statistics; a compiled model
whose split pass refuses the sparse gradient goes on with two micro-steps per step."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import simigrad_compile as sc
from simigrad_compile.runtime.ladder import Plan


class Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 4, sparse=True)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1))).squeeze(-1)


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (n, 3), generator=g)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return ids, y


def mean_grad(model, ids, y):
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(ids), y).backward()
    out = torch.cat([(p.grad.to_dense() if p.grad.is_sparse else p.grad).flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


def flat(model):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


@pytest.mark.parametrize("sizes", [(4, 4), (4, 4, 4), (4, 3)])
@pytest.mark.parametrize("clip", [None, (0.05, 2.0)])
def test_sparse_embedding_microsteps_statistics_and_steps_are_the_plain_loops(sizes, clip):
    torch.manual_seed(0)
    model = Bag()
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8,
                              max_micro_batch_size=4, group_mode="microsteps", lr_scaling="none")
    ids, y = data()
    pos = 0
    for _ in range(3):
        run.plan = Plan(4, len(sizes))
        batches = []
        for n in sizes:
            b = (ids[pos:pos + n], y[pos:pos + n])
            pos += n
            batches.append(b)
            run.next_micro_batch(n)
            F.mse_loss(model(b[0]), b[1].float()).backward()
            if clip:
                run.clip_grad_norm_(*clip)
            run.optimizer.step()
            run.optimizer.zero_grad()
        h = 1 if len(sizes) < 4 else 2
        cat = lambda bs: (torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs]))  # noqa: E731
        g1, g2 = mean_grad(ref, *cat(batches[:h])), mean_grad(ref, *cat(batches[h:]))
        rec = run.history[-1]
        assert rec["statistics"] == "microsteps" and rec["stepped"]
        assert math.isclose(rec["cosine"], float(F.cosine_similarity(g1, g2, dim=0)), rel_tol=1e-4, abs_tol=1e-5)
        # the plain loop: the mean gradient of the step's samples, clipped as torch does, one SGD step
        x_all, y_all = cat(batches)
        ref.zero_grad(set_to_none=True)
        F.mse_loss(ref(x_all), y_all).backward()
        norm = math.sqrt(sum(float((p.grad.to_dense() if p.grad.is_sparse else p.grad).pow(2).sum())
                             for p in ref.parameters()))
        assert math.isclose(rec["grad_norm"], norm, rel_tol=1e-4)
        if clip:  # clip_grad_norm_'s formula by hand (torch's own refuses sparse gradients)
            coef = min(1.0, clip[0] / (norm + 1e-6))
            for p in ref.parameters():
                p.grad.mul_(coef)
        ref_opt.step()
        ref.zero_grad(set_to_none=True)
        torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-5)


def test_compiled_sparse_embedding_goes_on_with_two_micro_steps(caplog):
    """The split pass refuses the sparse gradient (named in the warning); the run plans >= 2 micro-steps and
    every step, the first one-micro-step step included, is the plain loop's."""
    torch.manual_seed(0)
    model = Bag()
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager"})
    run = sc.AdaptiveBatching(compiled, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8,
                              max_micro_batch_size=8, lr_scaling="none", min_batch_size=8, max_batch_size=8)
    ids, y = data()
    pos = 0
    with caplog.at_level(logging.WARNING, logger="simigrad_compile"):
        for _ in range(3):
            plan = run.plan
            x, t = ids[pos:pos + plan.batch_size], y[pos:pos + plan.batch_size]
            pos += plan.batch_size
            for j in range(plan.accumulation):
                m = plan.micro_batch_size
                F.mse_loss(compiled(x[j * m:(j + 1) * m]), t[j * m:(j + 1) * m].float()).backward()
                run.optimizer.step()
                run.optimizer.zero_grad()
            ref.zero_grad(set_to_none=True)
            F.mse_loss(ref(x), t).backward()
            ref_opt.step()
            torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-5)
    assert [r["statistics"] for r in run.history] == ["none", "microsteps", "microsteps"]
    assert run.history[1]["accumulation"] == 2 and all(r["stepped"] for r in run.history)
    assert "sparse" in caplog.text


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_a_sparse_gradient_without_entries_has_norm_zero(norm_type):
    """Found by the property test: a sparse gradient zeroed in place (no entries) in a one-micro-batch step, then
    ``run.clip_grad_norm_`` of any norm type: the norm is 0 and the step (of zero gradients) is the plain loop's."""
    torch.manual_seed(0)
    model = Bag()
    raw = torch.optim.SGD(model.parameters(), lr=0.1)
    run = sc.AdaptiveBatching(model, raw, batch_size=4, max_micro_batch_size=4, group_mode="microsteps",
                              lr_scaling="none")
    before = flat(model).clone()
    ids, y = data(4)
    run.plan = Plan(4, 1)
    F.mse_loss(model(ids), y.float()).backward()
    raw.zero_grad(set_to_none=False)
    assert model.emb.weight.grad.is_sparse and model.emb.weight.grad.coalesce().values().numel() == 0
    assert float(run.clip_grad_norm_(0.01, norm_type)) == 0.0
    run.optimizer.step()
    assert run.history[-1]["stepped"] and run.history[-1]["grad_norm"] == 0.0
    torch.testing.assert_close(flat(model), before, rtol=0, atol=0)
