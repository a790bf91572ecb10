"""The three controllers (issue 17): each against an fp64 hand computation of its rule on a recorded sequence of
statistics, resume exactness, short steps, and the ``controller`` option's three doors."""

import math

import pytest
import torch

import simigrad_compile as sc
from simigrad_compile.config import ConfigError, SimigradConfig, from_mapping
from simigrad_compile.envvars import config_from_env
from simigrad_compile.runtime.controller import BatchSizeController, StepStatistics
from simigrad_testkit.loop_reference import Net, dataset, loss_of


def make(kind, b0=100, **kw):
    base = dict(controller=kind, target_similarity=0.2, min_batch_size=1, max_batch_size=10_000, noise_ema=0.9)
    base.update(kw)
    return BatchSizeController(SimigradConfig(**base), b0)


def recorded(n=40, seed=0, n1=50, n2=50):
    """A recorded sequence of (d, a, b, n1, n2): signal drifting from strong to weak, some negative dots."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        signal = 1.0 * 0.9 ** t
        noise_over = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        d = signal + (torch.randn(1, generator=g, dtype=torch.float64).item()) * 0.3
        a = signal + 20.0 * (0.5 + noise_over[0]) / n1
        b = signal + 20.0 * (0.5 + noise_over[1]) / n2
        out.append((d, a, b, n1, n2))
    return out


def step(d, a, b, n1, n2, full=True):
    return StepStatistics(d / math.sqrt(a * b), d, a, b, n1, n2, full)


def papers_estimates(d, a, b, n1, n2):
    """|G|^2 and tr(Sigma) by McCandlish et al.'s two-batch formulas, small = each group, big = all, averaged."""
    N = n1 + n2
    big = (n1 * n1 * a + n2 * n2 * b + 2 * n1 * n2 * d) / N ** 2     # |(n1 g1 + n2 g2)/N|^2
    sig = [(N * big - n * small) / (N - n) for small, n in ((a, n1), (b, n2))]
    tr = [(small - big) / (1 / n - 1 / N) for small, n in ((a, n1), (b, n2))]
    return sum(sig) / 2, sum(tr) / 2


def test_gns_rule_against_hand_computation():
    seq = recorded()
    decay, B = 0.9, 100
    c = make("gns", B, noise_ema=decay)
    S = G = 0.0
    moves = set()
    for t, rec in enumerate(seq, 1):
        sig, tr = papers_estimates(*rec)
        S, G = decay * S + (1 - decay) * tr, decay * G + (1 - decay) * sig
        s_hat, g_hat = S / (1 - decay ** t), G / (1 - decay ** t)      # bias-corrected averages
        b_simple = s_hat / g_hat if g_hat > 0 else math.inf
        up, down = max(B + 1, math.floor(1.1 * B)), min(B - 1, math.floor(0.9 * B))
        if b_simple >= up:
            B, kind = up, "up"
        elif b_simple <= down:
            B, kind = down, "down"
        else:
            B, kind = math.floor(b_simple + 0.5), "follow"
        B = min(max(B, 1), 10_000)
        moves.add(kind)
        decision = c.observe(step(*rec))
        assert decision.batch_size == B, t
        assert c.noise_scale == pytest.approx(b_simple, rel=1e-9)
        assert decision.lr_scale == pytest.approx(math.sqrt(B / 100), rel=1e-12)
    assert moves == {"up", "down", "follow"}


def test_adascale_gain_against_hand_computation():
    """Fixed batch 100 of two groups of 50; the LR multiplier is AdaScale's gain with S = 2, written as fairscale
    writes it from the workers' squared norms and the mean's (variance and |mean|^2 averaged with theta)."""
    seq = recorded(n1=50, n2=50)
    theta = 0.95
    c = make("adascale", 100, noise_ema=theta)
    var_avg = sqr_avg = 0.0
    for rec in seq:
        d, a, b, _, _ = rec
        local = a + b                                   # sum over the S = 2 workers of |g_i|^2
        total = (a + b + 2 * d) / 4                     # |mean of the two|^2
        var = local * (2 / 2) / (2 - 1) - total * 2 / (2 - 1)
        sqr = total - var / 2
        var_avg, sqr_avg = theta * var_avg + (1 - theta) * var, theta * sqr_avg + (1 - theta) * sqr
        assert var_avg > 0 and sqr_avg > 0             # no clamp: per-step values may be negative
        gain = (var_avg + sqr_avg) / (var_avg / 2 + sqr_avg)
        decision = c.observe(step(*rec))
        assert decision.batch_size == 100 and decision.skipped is None
        assert decision.lr_scale == pytest.approx(gain, rel=1e-9)
        assert 1.0 <= decision.lr_scale <= 2.0
    damped = make("adascale", 100, noise_ema=theta, lr_adjust_factor=0.5)
    for rec in seq:
        damped.observe(step(*rec))
    assert damped.lr_scale() == pytest.approx((gain - 1) * 0.5 + 1, rel=1e-9)
    assert make("adascale").lr_scale(100) == 1.0                    # no estimate yet


def test_simigrad_rule_unchanged_by_noise_statistics():
    seq = recorded()
    a, b = make("simigrad", ema=0.5), make("simigrad", ema=0.5)
    for rec in seq:
        assert a.observe(step(*rec)) == b.update(rec[0] / math.sqrt(rec[1] * rec[2]))


@pytest.mark.parametrize("kind", ["simigrad", "gns", "adascale"])
def test_resume_is_exact(kind):
    seq = recorded(60)
    whole = make(kind, ema=0.3)
    first = [whole.observe(step(*r)) for r in seq]
    part = make(kind, ema=0.3)
    for r in seq[:25]:
        part.observe(step(*r))
    resumed = make(kind, 7, ema=0.3)
    resumed.load_state_dict(part.state_dict())
    assert [resumed.observe(step(*r)) for r in seq[25:]] == first[25:]
    assert resumed.state_dict() == whole.state_dict()


@pytest.mark.parametrize("kind", ["simigrad", "gns", "adascale"])
def test_short_step_does_not_steer(kind):
    """A short step between two full ones leaves the target, the averages and the cosine EMA as they were."""
    seq = recorded(10)
    c, ref = make(kind, ema=0.5), make(kind, ema=0.5)
    for r in seq[:5]:
        c.observe(step(*r))
        ref.observe(step(*r))
    before = c.state_dict()
    d, a, b, _, _ = seq[5]
    decision = c.observe(step(-d, a * 9, b * 9, 3, 4, full=False))  # a tail of 7 samples, noisy
    assert decision.skipped == "short-step" and decision.batch_size == before["batch_size"]
    after = c.state_dict()
    assert {k: v for k, v in after.items() if k != "steps"} == {k: v for k, v in before.items() if k != "steps"}


def test_short_tail_step_recorded_and_not_steering():
    """Through the run: with 40 samples and batches of 12 (micro-batches of 4), epoch 0's tail has 2 micro-batches
    (8 samples): it is recorded as short-step and the next step's target is the one before it."""
    torch.manual_seed(0)
    model = Net()
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.01), batch_size=12,
                              micro_batch_sizes=(4,), group_mode="microsteps", target_similarity=1.0,
                              min_batch_size=8, max_batch_size=12)
    for x, y in run.dataloader(dataset(40)):
        loss_of(model, x, y).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    short = [i for i, r in enumerate(run.history) if r["skipped"] == "short-step"]
    assert short and all(run.history[i]["batch_size"] < 12 for i in short)
    for i in short:
        nxt = run.history[i + 1]["target_batch_size"] if i + 1 < len(run.history) else run.target_batch_size
        assert nxt == run.history[i]["target_batch_size"]
    run.close()


def test_controller_option_three_doors():
    with pytest.raises(ConfigError, match="'simigrad', 'gns', 'adascale'"):
        SimigradConfig(controller="pollux")
    assert from_mapping({"controller": "gns"}, base=SimigradConfig()).controller == "gns"
    assert config_from_env({"SIMIGRAD_CONTROLLER": "adascale"}).controller == "adascale"
    with pytest.raises(ConfigError, match="controller"):
        config_from_env({"SIMIGRAD_CONTROLLER": "fixed"})
    with pytest.raises(ConfigError, match="noise_ema"):
        SimigradConfig(noise_ema=1.0)
    model = Net()
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8, controller="gns")
    assert run.controller.kind == "gns"
    run.close()
