"""What a step's statistics cover, as numbers in every history record (issue 19): ``covered_elements`` and
``covered_sq_norm`` against fp64 computations, and the rule for partial coverage (steer from the covered part, a
warning with the figures). Cases: only the trunk compiled, a gradient hook after the batch statistics, a parameter
left ``unsplit``, the microsteps statistics (full) and a step without statistics (none)."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import simigrad_compile as sc
from simigrad_compile.runtime.coverage import REPEAT, coverage
from simigrad_compile.runtime.history import KEYS
from simigrad_compile.runtime.ladder import Plan
from simigrad_compile.stats.split_stats import SplitStats


class TrunkHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8),
                                         torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.trunk(x)).squeeze(-1)


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, x.sum(1).sin() + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def grads(model, x, y, scale=1.0):
    model.zero_grad(set_to_none=True)
    (F.mse_loss(model(x), y) * scale).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def shares(g, covered):
    n_all = sum(t.numel() for t in g.values())
    sq_all = sum(float(t.pow(2).sum()) for t in g.values())
    return (sum(g[n].numel() for n in covered) / n_all, sum(float(g[n].pow(2).sum()) for n in covered) / sq_all)


def half_cosine(ref, x, y, names):
    h = len(x) // 2
    g1, g2 = grads(ref, x[:h], y[:h]), grads(ref, x[h:], y[h:])
    v1, v2 = (torch.cat([g[n].flatten() for n in names]) for g in (g1, g2))
    return float(F.cosine_similarity(v1, v2, dim=0))


def run_for(model, **kw):
    opts = dict(batch_size=8, max_micro_batch_size=8, min_batch_size=8, max_batch_size=8, lr_scaling="none")
    opts.update(kw)
    return sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.05), **opts)


def one_step(model, run, ref, ref_opt, x, y, hook_scale=None):
    plan = run.plan
    m = plan.micro_batch_size
    for j in range(plan.accumulation):
        F.mse_loss(model(x[j * m:(j + 1) * m].float()), y[j * m:(j + 1) * m].float()).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    ref.zero_grad(set_to_none=True)
    F.mse_loss(ref(x), y).backward()
    ref_opt.step()
    ref.zero_grad(set_to_none=True)
    torch.testing.assert_close(torch.cat([p.detach().double().flatten() for p in model.parameters()]),
                               torch.cat([p.detach().flatten() for p in ref.parameters()]), rtol=1e-5, atol=1e-5)


def test_only_the_trunk_compiled_records_its_share_and_warns(caplog):
    torch.manual_seed(0)
    model = TrunkHead()
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    model.trunk = torch.compile(model.trunk, backend="simigrad", options={"compiler": "aot_eager"})
    run = run_for(model)
    x, y = data()
    trunk = [n for n, _ in ref.named_parameters() if n.startswith("trunk.")]
    with caplog.at_level(logging.WARNING, logger="simigrad_compile"):
        for s in range(3):
            xs, ys = x[8 * s:8 * s + 8], y[8 * s:8 * s + 8]
            want_e, want_sq = shares(grads(ref, xs, ys), trunk)
            want_cos = half_cosine(ref, xs, ys, trunk)
            one_step(model, run, ref, ref_opt, xs, ys)
            rec = run.history[-1]
            assert set(rec) == set(KEYS)
            assert rec["statistics"] == "batch" and rec["accumulation"] == 1
            assert rec["covered_elements"] == pytest.approx(want_e, abs=1e-12)
            assert 0 < want_sq < 1 and rec["covered_sq_norm"] == pytest.approx(want_sq, rel=1e-4)
            assert rec["cosine"] == pytest.approx(want_cos, abs=1e-4)  # the covered part steers
            assert "'head.weight'" in rec["note"] and f"{want_e:.3g}" in rec["note"]
    warned = [r.getMessage() for r in caplog.records if "the statistics cover" in r.getMessage()]
    assert len(warned) == 1 and "steered from the covered part" in warned[0] and "head.bias" in warned[0]


def _double_grad(param):
    param.grad.mul_(2)


@pytest.mark.parametrize("kind", ["tensor", "post-accumulate"])
def test_a_gradient_hook_after_the_batch_statistics_is_named(kind):
    """One micro-step per step: the step is the plain loop's with the hook; the hooked parameter's statistic is
    of the gradient before the hook, so it is uncovered and named as such."""
    torch.manual_seed(0)
    model = TrunkHead()
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for m in (model, ref):
        if kind == "tensor":
            m.head.weight.register_hook(lambda g: 2 * g)
        else:
            m.head.weight.register_post_accumulate_grad_hook(_double_grad)
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager"})
    run = run_for(compiled)
    x, y = data()
    for s in range(2):
        xs, ys = x[8 * s:8 * s + 8], y[8 * s:8 * s + 8]
        g = grads(ref, xs, ys)  # with the hook: what the step applies
        covered = [n for n in g if n != "head.weight"]
        want_e, want_sq = shares(g, covered)
        one_step(compiled, run, ref, ref_opt, xs, ys)
        rec = run.history[-1]
        assert rec["statistics"] == "batch"
        assert rec["covered_elements"] == pytest.approx(want_e, abs=1e-12)
        assert rec["covered_sq_norm"] == pytest.approx(want_sq, rel=1e-4)
        assert "gradient hook that runs after the statistics ('head.weight')" in rec["note"]


def test_microsteps_cover_everything_and_a_step_without_statistics_nothing():
    torch.manual_seed(0)
    model = TrunkHead()
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    run = run_for(model, group_mode="microsteps", max_micro_batch_size=4)
    x, y = data()
    one_step(model, run, ref, ref_opt, x[:8], y[:8])
    rec = run.history[-1]
    assert rec["statistics"] == "microsteps" and rec["accumulation"] == 2
    assert (rec["covered_elements"], rec["covered_sq_norm"], rec["note"]) == (1.0, 1.0, None)
    run.plan = Plan(8, 1)  # one micro-step of an uncompiled model: no statistics at all
    one_step(model, run, ref, ref_opt, x[8:16], y[8:16])
    rec = run.history[-1]
    assert rec["statistics"] == "none" and (rec["covered_elements"], rec["covered_sq_norm"]) == (0.0, 0.0)


def test_unsplit_and_missing_parameters_count_as_uncovered():
    """``coverage`` itself: a parameter named in ``unsplit`` (a gradient summed over several backward nodes) or
    ``missing`` is uncovered; the shares are those of fp64 sums."""
    torch.manual_seed(0)
    model = TrunkHead().double()
    x, y = data(8)
    F.mse_loss(model(x), y).backward()
    g = {n: p.grad for n, p in model.named_parameters()}
    stats = SplitStats(1.0, 1.0, 1.0, "batch", missing=("head.bias",), unsplit={"trunk.0.weight": "repeated"})
    cover = coverage(list(model.parameters()), stats, model, None)
    want_e, want_sq = shares(g, [n for n in g if n not in ("head.bias", "trunk.0.weight")])
    assert cover.elements == pytest.approx(want_e, abs=1e-12) and cover.sq_norm == pytest.approx(want_sq, rel=1e-12)
    assert set(cover.uncovered) == {"head.bias", "trunk.0.weight"} and cover.pre_hook == ()
    full = coverage(list(model.parameters()), SplitStats(1.0, 1.0, 1.0, "batch"), model, None)
    assert (full.elements, full.sq_norm) == (1.0, 1.0)
    assert REPEAT >= 1


def test_a_second_live_run_on_the_model_is_no_gradient_hook(caplog):
    """Two runs on one model (an earlier run not closed, as in a notebook cell run twice): each run's counting
    hooks read ``p.grad`` only, so neither run takes the other's for a hook of the loop's; the statistics cover the
    whole gradient, the steps are the plain loop's, and a real hook added later is still named."""
    torch.manual_seed(0)
    model = TrunkHead()
    ref = copy.deepcopy(model).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager"})
    earlier = run_for(compiled)
    x, y = data()
    one_step(compiled, earlier, ref, ref_opt, x[:8], y[:8])
    run = run_for(compiled)
    with caplog.at_level(logging.WARNING, logger="simigrad_compile"):
        for s in range(1, 3):
            one_step(compiled, run, ref, ref_opt, x[8 * s:8 * s + 8], y[8 * s:8 * s + 8])
            rec = run.history[-1]
            assert rec["statistics"] == "batch" and rec["note"] is None
            assert rec["covered_elements"] == 1.0 and rec["covered_sq_norm"] == 1.0
    assert not [r for r in caplog.records if "the statistics cover" in r.getMessage()]
    for m in (model, ref):
        m.head.weight.register_post_accumulate_grad_hook(_double_grad)
    one_step(compiled, run, ref, ref_opt, x[24:32], y[24:32])
    assert "gradient hook that runs after the statistics ('head.weight')" in run.history[-1]["note"]
    run.close()
    earlier.close()
