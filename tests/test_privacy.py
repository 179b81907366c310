"""The privacy math: the mechanism is unbiased with the declared scale, the interval covers as promised.

Statistical tests use fixed seeds and tolerances of 6 standard errors derived from the math, so they
cannot flake, yet a bias of the size that matters (0.05 points, FACTS.md's goal) is far outside them.
"""

import math
from collections import Counter

import numpy as np
import pytest

from shared.privacy import (
    activity_epsilon,
    estimate_mean,
    grouped_half_width,
    laplace_release,
    laplace_scale,
    mean_sensitivity,
    samples_touched,
    units_per_window,
    epsilon_per_unit,
)


def noise_half_width(laplace_scales, gauss_std: float = 0.0, level: float = 0.95) -> float:
    """h with P(|sum_i L_i + G| <= h) = level, for a plain list of Laplace scales."""
    return grouped_half_width(tuple(sorted(Counter(laplace_scales).items())), gauss_std, level)


def test_sensitivity_and_scale():
    assert mean_sensitivity(0, 100, 200) == 0.5
    assert laplace_scale(0.5, 0.5) == 1.0
    rel = laplace_release(3.0, epsilon=0.5, sensitivity=0.5, random_state=1)
    assert rel.noise_scale == 1.0 and rel.noise_std == pytest.approx(math.sqrt(2))
    assert rel.mechanism == "laplace" and rel.delta == 0 and "diffprivlib" in rel.implementation


@pytest.mark.parametrize("bad", [dict(lower=1, upper=1, n_samples=3), dict(lower=0, upper=100, n_samples=0)])
def test_sensitivity_refuses_bad_arguments(bad):
    with pytest.raises(ValueError, match="must"):
        mean_sensitivity(**bad)


def _draws(true_value: float, n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return np.array([
        laplace_release(true_value, epsilon=0.5, sensitivity=0.5 * scale, random_state=rng).value for _ in range(n)
    ])


@pytest.mark.parametrize("true_value", [0.5, 3.0, 60.0, 99.5])
def test_mechanism_is_unbiased_with_declared_variance(true_value):
    """Mean error within 6 standard errors, even next to the bounds (no clamping: values may leave [0, 100])."""
    n, b = 20000, 1.0
    x = _draws(true_value, n, seed=int(true_value * 10))
    se_mean = math.sqrt(2) * b / math.sqrt(n)
    assert abs(x.mean() - true_value) < 6 * se_mean  # 6 * 0.01 = 0.06 points
    se_var = math.sqrt(20 / n) * b**2  # Var(s^2) ~ (mu4 - sigma^4) / n = (24 b^4 - 4 b^4) / n
    assert abs(x.var() - 2 * b**2) < 6 * se_var


def test_truncated_tools_mean_is_biased_near_zero_and_ours_is_not():
    """Why we do not use diffprivlib.tools.mean: it clamps into the bounds, so an idle machine reads high."""
    from diffprivlib.tools import mean as dp_mean

    samples = np.full(50, 3.0)
    rng = np.random.RandomState(7)
    theirs = np.array([dp_mean(samples, epsilon=0.5, bounds=(0, 100), random_state=rng) for _ in range(4000)])
    ours = _draws(3.0, 4000, seed=8, scale=4.0)  # the tutorial's noise scale: 100 / 50 / 0.5
    se = math.sqrt(2) * 4.0 / math.sqrt(4000)
    assert theirs.mean() - 3.0 > 6 * se  # about +0.9 points (FACTS.md)
    assert abs(ours.mean() - 3.0) < 6 * se


def test_half_width_matches_closed_forms():
    b = 2.0
    assert noise_half_width([b]) == pytest.approx(b * math.log(20), rel=1e-6)  # P(|L| > h) = exp(-h / b)
    assert noise_half_width([], gauss_std=1.0) == pytest.approx(1.959964, rel=1e-5)
    big = noise_half_width([1.0] * 2000)
    assert big / math.sqrt(2 * 2000) == pytest.approx(1.959964, rel=2e-3)  # CLT limit


@pytest.mark.parametrize("scales", [[1.0, 1.0, 1.0], [0.5, 2.0, 4.0, 1.0]])
def test_half_width_is_exact_by_simulation(scales):
    """Empirical coverage of h within 6 binomial standard errors of 95 % (200k draws: +-0.003). A normal
    approximation misses it for 3 Laplace terms: 1.96 sd covers about 94.5 %."""
    n = 200_000
    rng = np.random.default_rng(11)
    noise = sum(rng.laplace(0.0, b, n) for b in scales)
    h = noise_half_width(scales)
    tol = 6 * math.sqrt(0.95 * 0.05 / n)
    assert abs(np.mean(np.abs(noise) <= h) - 0.95) < tol
    if scales == [1.0, 1.0, 1.0]:
        normal_h = 1.959964 * math.sqrt(2 * 3)
        assert np.mean(np.abs(noise) <= normal_h) < 0.95 - tol


def test_estimate_interval_coverage_and_unbiasedness():
    """Seeded simulation of the whole estimator: k members with different true means and scales."""
    rng = np.random.default_rng(5)
    true = np.array([3.0, 40.0, 97.0, 12.0])
    scales = np.array([1.0, 1.0, 4.0, 0.5])
    trials, covered, errors = 4000, 0, []
    for _ in range(trials):
        est = estimate_mean(true + rng.laplace(0, scales), scales)
        covered += est.ci_low <= true.mean() <= est.ci_high
        errors.append(est.mean - true.mean())
    se = math.sqrt(np.sum(2 * scales**2)) / len(true)
    assert est.standard_error == pytest.approx(se)
    assert abs(covered / trials - 0.95) < 6 * math.sqrt(0.95 * 0.05 / trials)
    assert abs(np.mean(errors)) < 6 * se / math.sqrt(trials)


def test_group_privacy_in_samples():
    assert samples_touched(0, 0.1) == 1
    assert samples_touched(0.1, 0.1) == 2  # a 0.1 s burst can straddle two samples
    assert samples_touched(1.0, 0.1) == 11
    assert samples_touched(0.15, 0.1) == 3


def test_group_privacy_in_the_fixed_unit():
    """Activity lasting d seconds costs epsilon per second it covers, whatever the settings: 1 s, 1 min, a window."""
    assert activity_epsilon(0, epsilon=5.0) == 5.0  # a spike is within one second
    assert activity_epsilon(1.0, epsilon=5.0) == 5.0
    assert activity_epsilon(60, epsilon=5.0) == pytest.approx(300.0)
    assert activity_epsilon(20, epsilon=5.0) == pytest.approx(100.0)
    assert activity_epsilon(3600, epsilon=5.0) == pytest.approx(18000.0)


def test_window_sensitivity_is_per_whole_second():
    """n = floor(interval): a window's sensitivity 100 / n never understates 100 / T for T >= interval seconds."""
    assert [units_per_window(w) for w in (1.0, 1.5, 20.0, 20.999, 3600.0)] == [1, 1, 20, 20, 3600]
    for bad in (0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="interval_s"):
            units_per_window(bad)


def test_legacy_sample_epsilon_is_converted_conservatively():
    """An old cpu_sample release: 1 s of activity touched up to ceil(1 / s) + 1 samples of s seconds."""
    assert epsilon_per_unit("cpu_second", 5.0, n_samples=20, window_s=20.0) == 5.0
    assert epsilon_per_unit("cpu_sample", 0.5, n_samples=200, window_s=20.0) == pytest.approx(5.5)  # s = 0.1: x 11
    assert epsilon_per_unit("cpu_sample", 0.5, n_samples=2000, window_s=20.0) == pytest.approx(50.5)  # s = 0.01: x 101
    # a clock step that stretched the window never makes the period look longer than the old default 0.1 s
    assert epsilon_per_unit("cpu_sample", 0.5, n_samples=200, window_s=3620.0) == pytest.approx(5.5)
    with pytest.raises(ValueError, match="unknown privacy unit"):
        epsilon_per_unit("cpu_minute", 1.0, n_samples=1, window_s=60.0)
