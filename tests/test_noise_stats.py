"""The noise family (issue 17): cosine, noise scale and gain ratio against fp64 computations from PER-SAMPLE
gradients of a small model (``torch.func``), and end to end through the run's history (``microsteps`` and
``batch`` statistics)."""

import copy

import pytest
import torch
from torch.func import functional_call, grad, vmap

import simigrad_compile as sc
from simigrad_compile.runtime.ladder import Plan
from simigrad_compile.stats import noise as nz
from simigrad_testkit.loop_reference import Net, dataset, loss_of


def per_sample_grads(model, x, y):
    """``[N, D]`` fp64 per-sample gradients of the MSE loss (``vmap(grad)``), independent of the library."""
    m = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m.named_parameters()}

    def one(p, xi, yi):
        return torch.nn.functional.mse_loss(functional_call(m, p, (xi[None],)), yi[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x.double(), y.double())
    return torch.cat([g[k].reshape(len(x), -1) for k in params], 1)


def population():
    torch.manual_seed(0)
    x, y = dataset(64, dtype=torch.float64).tensors
    return per_sample_grads(Net(), x, y)


def mccandlish(small_sq, big_sq, b_small, b_big):
    """The paper's two-batch-size estimators (McCandlish et al. 2018, A.1), written from the paper."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    s = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


@pytest.mark.parametrize("n1, n2", [(6, 6), (7, 5), (3, 10), (1, 2)])
def test_estimators_equal_the_papers_two_batch_estimators(n1, n2):
    """On one draw: signal/noise are the mean of McCandlish's estimators with small = each group, big = all, where
    |g_big|^2 comes straight from the per-sample gradients (not from d, a, b)."""
    P = population()
    g = torch.Generator().manual_seed(n1 * 31 + n2)
    idx = torch.randint(0, len(P), (n1 + n2,), generator=g)
    g1, g2, whole = P[idx[:n1]].mean(0), P[idx[n1:]].mean(0), P[idx].mean(0)
    d, a, b = float(g1 @ g2), float(g1 @ g1), float(g2 @ g2)
    big = float(whole @ whole)
    ref = [mccandlish(a, big, n1, n1 + n2), mccandlish(b, big, n2, n1 + n2)]
    assert nz.full_sq_norm(d, a, b, n1, n2) == pytest.approx(big, rel=1e-12)
    assert nz.signal_estimate(d, a, b, n1, n2) == pytest.approx((ref[0][0] + ref[1][0]) / 2, rel=1e-9, abs=1e-15)
    assert nz.noise_estimate(d, a, b, n1, n2) == pytest.approx((ref[0][1] + ref[1][1]) / 2, rel=1e-9)
    assert nz.cosine(d, a, b) == pytest.approx(float(torch.nn.functional.cosine_similarity(g1, g2, 0)), rel=1e-12)
    # the batch split's contributions (n_j/N) g_j map back to the means
    c1, c2 = g1 * n1 / (n1 + n2), g2 * n2 / (n1 + n2)
    back = nz.means_from_contributions(float(c1 @ c2), float(c1 @ c1), float(c2 @ c2), n1, n2)
    assert back == pytest.approx((d, a, b), rel=1e-12)


@pytest.mark.parametrize("n1, n2", [(4, 4), (5, 3)])
def test_estimators_are_unbiased_over_draws(n1, n2):
    """Monte Carlo over 40000 i.i.d. draws (with replacement) from 64 per-sample gradients: the means of the
    estimates are the population's |G|^2 and tr(Sigma), and the gain ratio is E|g_half|^2 / E|g_all|^2."""
    P = population()
    G = P.mean(0)
    trace = float(((P - G) ** 2).sum(1).mean())
    signal = float(G @ G)
    T = 40000
    idx = torch.randint(0, len(P), (T, n1 + n2), generator=torch.Generator().manual_seed(1))
    g1, g2 = P[idx[:, :n1]].mean(1), P[idx[:, n1:]].mean(1)
    d, a, b = (g1 * g2).sum(1), (g1 * g1).sum(1), (g2 * g2).sum(1)
    est_s, est_n = nz.signal_estimate(d, a, b, n1, n2), nz.noise_estimate(d, a, b, n1, n2)
    for est, truth in ((est_s, signal), (est_n, trace)):
        err = est.std().item() / T ** 0.5
        assert abs(est.mean().item() - truth) < 4 * err, (est.mean().item(), truth, err)
    if n1 == n2:
        whole = P[idx].mean(1)
        expected_gain = float(((g1 * g1).sum(1).mean() + (g2 * g2).sum(1).mean()) / 2 / (whole * whole).sum(1).mean())
        got = nz.gain_ratio(trace, signal, n1, n1 + n2)
        assert got == pytest.approx(expected_gain, rel=0.02)
        # AdaScale's own two-worker estimator on every draw
        adascale = 2 * (a + b) / (a + b + 2 * d)
        torch.testing.assert_close(nz.gain_ratio(est_n, est_s, n1, 2 * n1), adascale, rtol=1e-10, atol=1e-10)


def _check_record(record, P_step, n1):
    g1, g2 = P_step[:n1].mean(0), P_step[n1:].mean(0)
    d, a, b = float(g1 @ g2), float(g1 @ g1), float(g2 @ g2)
    n2 = len(P_step) - n1
    whole = P_step.mean(0)
    ref = [mccandlish(a, float(whole @ whole), n1, n1 + n2), mccandlish(b, float(whole @ whole), n2, n1 + n2)]
    assert record["signal"] == pytest.approx((ref[0][0] + ref[1][0]) / 2, rel=2e-4, abs=1e-7)
    assert record["noise"] == pytest.approx((ref[0][1] + ref[1][1]) / 2, rel=2e-4)
    return (ref[0][0] + ref[1][0]) / 2, (ref[0][1] + ref[1][1]) / 2


def test_history_microsteps_statistics_match_per_sample_reference():
    """Three micro-batches of 4 (halves of 4 and 8 samples): the history's signal, noise, gns and gain against the
    per-sample fp64 computation, over two steps (the averages with noise_ema)."""
    torch.manual_seed(0)
    model = Net()
    x, y = dataset(24).tensors
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=12,
                              micro_batch_sizes=(4,), group_mode="microsteps", min_batch_size=12, max_batch_size=12,
                              noise_ema=0.5)
    estimates = []
    for step in range(2):
        P = per_sample_grads(model, x[12 * step:12 * step + 12], y[12 * step:12 * step + 12])
        for j in range(3):
            s = slice(12 * step + 4 * j, 12 * step + 4 * j + 4)
            loss_of(model, x[s], y[s]).backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
        estimates.append(_check_record(run.history[-1], P, 4))
    sig = 0.5 * 0.5 * estimates[0][0] + 0.5 * estimates[1][0]  # EMA from zero
    noi = 0.5 * 0.5 * estimates[0][1] + 0.5 * estimates[1][1]
    rec = run.history[-1]
    assert rec["gns"] == pytest.approx(noi / sig, rel=1e-3)
    assert rec["gain"] == pytest.approx((noi / 6 + sig) / (noi / 12 + sig), rel=1e-3)
    run.close()


def test_history_batch_statistics_match_per_sample_reference():
    """One compiled micro-batch of 7 (the batch split: 3 and 4 samples, contributions turned into means)."""
    from simigrad_compile.compile.backend import simigrad_backend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(model, backend=lambda gm, ex: simigrad_backend(gm, ex, options={"compiler": "aot_eager"}))
    x, y = dataset(7).tensors
    P = per_sample_grads(model, x, y)
    run = sc.AdaptiveBatching(compiled, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=7,
                              max_micro_batch_size=8, min_batch_size=7, max_batch_size=7)
    run.plan = Plan(7, 1)
    loss_of(compiled, x, y).backward()
    run.optimizer.step()
    assert run.history[-1]["statistics"] == "batch"
    _check_record(run.history[-1], P, 3)
    run.close()
