"""The gradient-noise family from one step's split statistics: the cosine, the gradient noise scale, the gain ratio.

Pure arithmetic on floats (or tensors: only ``+ - * /`` are used, no ``math``), no runtime imports.

Setting. A step's ``N = n1 + n2`` samples are i.i.d. draws whose per-sample gradients ``g_i`` have mean ``G`` and
covariance ``Sigma``. The two groups' **mean** gradients are ``g1`` (over ``n1`` samples) and ``g2`` (over
``n2``); the step's mean gradient is ``g = (n1 g1 + n2 g2) / N``. The split statistics are

    d = g1.g2,   a = |g1|^2,   b = |g2|^2.

Their expectations, the groups being independent:

    E[d] = |G|^2,   E[a] = |G|^2 + tr(Sigma)/n1,   E[b] = |G|^2 + tr(Sigma)/n2,   E|g|^2 = |G|^2 + tr(Sigma)/N.

The ``batch`` split records the halves' *contributions* to the mean, ``c_j = (n_j / N) g_j`` (``g = c1 + c2``);
:func:`means_from_contributions` turns their statistics into those of the means.
"""

from __future__ import annotations


def means_from_contributions(d, a, b, n1, n2):
    """``(d, a, b)`` of the group means from those of the contributions ``c_j = (n_j/N) g_j``:

        d_g = d * N^2 / (n1 n2),   a_g = a * N^2 / n1^2,   b_g = b * N^2 / n2^2.
    """
    n = n1 + n2
    return d * (n * n) / (n1 * n2), a * (n * n) / (n1 * n1), b * (n * n) / (n2 * n2)


def cosine(d, a, b):
    """The paper's statistic, ``d / sqrt(a b)`` (scale-free: means and contributions give the same value)."""
    return d / (a * b) ** 0.5


def full_sq_norm(d, a, b, n1, n2):
    """``|g|^2`` of the step's mean ``g = (n1 g1 + n2 g2)/N``:

        |g|^2 = (n1^2 a + n2^2 b + 2 n1 n2 d) / N^2        (= (a + b + 2d)/4 when n1 = n2).
    """
    n = n1 + n2
    return (n1 * n1 * a + n2 * n2 * b + 2 * n1 * n2 * d) / (n * n)


def signal_estimate(d, a, b, n1, n2):
    """Unbiased estimate of ``|G|^2`` (McCandlish et al., 2018, appendix A.1, small batch = a group, big batch =
    the whole step, averaged over the two choices of the small group).

    With small batch ``n_j`` (norm ``|g_j|^2``) and big batch ``N`` (norm ``|g|^2``) the paper's estimator is

        |G|^2_j = (N |g|^2 - n_j |g_j|^2) / (N - n_j).

    Substituting :func:`full_sq_norm`: ``|G|^2_1 = (2 n1 d + n2 b - n1 a)/N`` and ``|G|^2_2 = (2 n2 d + n1 a -
    n2 b)/N``. Their mean is exactly

        |G|^2_est = d,

    unbiased for any ``n1, n2`` (``E[d] = |G|^2``). ``a`` and ``b`` are accepted for a uniform signature.
    """
    return d


def noise_estimate(d, a, b, n1, n2):
    """Unbiased estimate of ``tr(Sigma)`` (per-sample noise; McCandlish et al.'s ``S``), the mean of the paper's
    two estimators (small batch = group ``j``, big batch = the whole step)

        S_j = (|g_j|^2 - |g|^2) / (1/n_j - 1/N).

    Substituting :func:`full_sq_norm`: ``S_1 = n1 ((2 n1 + n2) a - n2 b - 2 n1 d) / N`` and ``S_2 = n2 ((2 n2 +
    n1) b - n1 a - 2 n2 d) / N``; their mean is

        S_est = (n1^2 (a - d) + n2^2 (b - d)) / N            (= n (a + b - 2d)/2 = n |g1 - g2|^2 / 2 at n1 = n2 = n).

    Unbiased: ``E[a - d] = tr(Sigma)/n1``, ``E[b - d] = tr(Sigma)/n2``, so ``E[S_est] = (n1 + n2) tr(Sigma)/N``.
    """
    return (n1 * n1 * (a - d) + n2 * n2 * (b - d)) / (n1 + n2)


def ema(previous, value, decay):
    """``decay * previous + (1 - decay) * value``, starting from ``previous = 0``. The noise scale and the gain are
    ratios of two such averages taken with the same decay, so the start-up bias ``1 - decay^t`` cancels in them:
    the ratio of the EMAs equals the ratio of the bias-corrected EMAs."""
    return decay * previous + (1 - decay) * value


def noise_scale(noise, signal):
    """McCandlish et al.'s simple noise scale ``B_simple = tr(Sigma) / |G|^2``. Given the EMAs of the numerator and
    the denominator (the authors' smoothing: average each, then take the ratio)."""
    return noise / signal


def gain_ratio(noise, signal, base, batch):
    """AdaScale's gain ratio (Johnson et al., 2020) of ``batch`` samples over ``base`` samples, ``S = batch/base``:

        r = E|g_base|^2 / E|g_batch|^2 = (tr(Sigma)/base + |G|^2) / (tr(Sigma)/batch + |G|^2)
          = (sigma^2 + mu^2) / (sigma^2 / S + mu^2)    with sigma^2 = tr(Sigma)/base, mu^2 = |G|^2.

    For the split statistics ``S = 2``, ``base = N/2``, ``batch = N``. At ``n1 = n2`` with the unsmoothed
    estimates this is AdaScale's own estimator for two workers, ``r = ((a + b)/2) / |g|^2 = 2 (a + b) / (a + b +
    2d)``: the mean squared norm of the groups over that of their mean. In ``[1, S]`` when both terms are >= 0.
    """
    return (noise / base + signal) / (noise / batch + signal)


__all__ = ["means_from_contributions", "cosine", "full_sq_norm", "signal_estimate", "noise_estimate", "ema",
           "noise_scale", "gain_ratio"]
