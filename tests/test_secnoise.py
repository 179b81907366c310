"""shared.secure.secnoise: the shares sum to the promised noise, calibration round-trips through dp-accounting, the
default source is cryptographic, quantization is unbiased, and the fleet intervals cover as stated.

Statistical tests use fixed seeds and tolerances derived from the math: 6 standard errors for means and variances
(the standard error of a sample variance is sqrt((mu4 - sigma^4) / N), mu4 from the law's cumulants), df + 6 sd for
a chi-square statistic (sd = sqrt(2 df)), 6 binomial standard deviations for coverage. Speed is the bench's.
"""

from __future__ import annotations

import ast
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event, rdp

from shared.privacy import Interval
from shared.secure import secnoise
from shared.secure.secnoise import (
    FAMILIES,
    NoiseSpec,
    calibrate,
    epsilon_of,
    fleet_estimate,
    fleet_mean,
    noise_sd,
    quantize,
    release_event,
    sample_share,
)

EDGES = [5.0 * i for i in range(21)]


def _dlap_pmf(a: float, x: int) -> float:
    return math.tanh(a / 2) * math.exp(-a * abs(x))


def _chi_square_limit(df: int) -> float:
    return df + 6 * math.sqrt(2 * df)


def _chi_square(draws: list[int], pmf, k_max: int) -> tuple[float, int]:
    """Pearson statistic over -k_max..k_max plus the two tails; returns (statistic, degrees of freedom)."""
    n, counts = len(draws), Counter(draws)
    cells = [(counts[x], n * pmf(x)) for x in range(-k_max, k_max + 1)]
    inside = sum(pmf(x) for x in range(-k_max, k_max + 1))
    below = sum(c for x, c in counts.items() if x < -k_max)
    above = sum(c for x, c in counts.items() if x > k_max)
    cells += [(below, n * (1 - inside) / 2), (above, n * (1 - inside) / 2)]
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


def _spec(family: str, mean_param: float, hist_param: float, t: int, n_hist: int = 1, sens: int = 100) -> NoiseSpec:
    return NoiseSpec(family=family, mean_sensitivity=sens, mean_param=mean_param, hist_param=hist_param,
                     shares_for=t, n_hist=n_hist)


def _sums(spec: NoiseSpec, n_sums: int, seed: int) -> np.ndarray:
    """n_sums sums of shares_for shares (rows), one column per coordinate."""
    rng = random.Random(seed)
    t = spec.shares_for
    return np.array([np.sum([sample_share(spec, spec.n_hist, rng) for _ in range(t)], axis=0) for _ in range(n_sums)])


# ---------------------------------------------------------------------------------------------------
# The shares sum to the promised noise
# ---------------------------------------------------------------------------------------------------
def test_dlaplace_shares_of_t_members_sum_to_dlap():
    """Sum of t = 4 shares: chi-square against DLap(0.7), and mean 0 / variance 2q/(1-q)^2 within 6 standard errors,
    for a light (a = 0.7) and a wide (a = 0.05) coordinate."""
    n = 20_000
    sums = _sums(_spec("dlaplace", 0.7, 0.05, t=4), n, seed=1)
    stat, df = _chi_square(sums[:, 0].tolist(), lambda x: _dlap_pmf(0.7, x), k_max=10)
    assert stat < _chi_square_limit(df), (stat, df)
    for col, a in ((0, 0.7), (1, 0.05)):
        q = math.exp(-a)
        var = 2 * q / (1 - q) ** 2
        kappa4 = 2 * q * (1 + 4 * q + q * q) / (1 - q) ** 4  # two NB(1, q): even cumulants add
        x = sums[:, col]
        assert abs(x.mean()) < 6 * math.sqrt(var / n)
        assert abs(x.var() - var) < 6 * math.sqrt((kappa4 + 2 * var**2) / n)  # mu4 - sigma^4 = kappa4 + 2 sigma^4


def _dgauss_moments(s2: float) -> tuple[float, float]:
    """(variance, fourth cumulant) of N_Z(0, s2), summed exactly."""
    w = {x: math.exp(-x * x / (2 * s2)) for x in range(-int(40 * math.sqrt(s2)) - 40, int(40 * math.sqrt(s2)) + 41)}
    z = sum(w.values())
    m2 = sum(x**2 * p for x, p in w.items()) / z
    m4 = sum(x**4 * p for x, p in w.items()) / z
    return m2, m4 - 3 * m2**2


def test_dgaussian_share_is_the_discrete_gaussian_and_t_shares_have_the_total_variance():
    """One share against the exact N_Z(0, sigma^2 / t) pmf (chi-square); the sum of t = 4 shares has the variance
    noise_sd states (sigma^2 for sigma = 3; less for sigma = 1.1, whose shares are N_Z(0, 0.3)), within 6 standard
    errors (cumulants of the sum: t times the share's, summed exactly)."""
    spec = _spec("dgaussian", 3.0, 1.1, t=4)
    rng = random.Random(2)
    one = [sample_share(spec, 1, rng)[0] for _ in range(20_000)]
    s2 = 9.0 / 4
    norm = sum(math.exp(-x * x / (2 * s2)) for x in range(-60, 61))
    stat, df = _chi_square(one, lambda x: math.exp(-x * x / (2 * s2)) / norm, k_max=5)
    assert stat < _chi_square_limit(df), (stat, df)
    n = 10_000
    sums = _sums(spec, n, seed=3)
    for col, sigma in ((0, 3.0), (1, 1.1)):
        share_var, share_k4 = _dgauss_moments(sigma**2 / 4)
        var, k4 = 4 * share_var, 4 * share_k4
        assert noise_sd(spec, 4)[col] ** 2 == pytest.approx(var, rel=1e-12)
        x = sums[:, col]
        assert abs(x.mean()) < 6 * math.sqrt(var / n)
        assert abs(x.var() - var) < 6 * math.sqrt((k4 + 2 * var**2) / n)
    assert noise_sd(spec, 4)[0] == pytest.approx(3.0, rel=1e-12)
    assert noise_sd(spec, 4)[1] < 1.1


def test_sample_share_shape_and_refusals():
    spec = _spec("dlaplace", 0.01, 0.5, t=3, n_hist=20)
    share = sample_share(spec, 20, random.Random(5))
    assert len(share) == 21 and all(type(v) is int for v in share)
    with pytest.raises(ValueError, match="n_hist"):
        sample_share(spec, 19)


# ---------------------------------------------------------------------------------------------------
# Calibration and accounting
# ---------------------------------------------------------------------------------------------------
CASES = [
    dict(family="dlaplace", epsilon=2.0, delta=0.0, mean_sensitivity=1000, releases=1, mean_fraction=0.5,
         shares_for=80),
    dict(family="dlaplace", epsilon=5.0, delta=0.0, mean_sensitivity=50, releases=3, mean_fraction=0.8, shares_for=8),
    dict(family="dlaplace", epsilon=10.0, delta=1e-6, mean_sensitivity=1000, releases=288, mean_fraction=0.8,
         shares_for=800),
    dict(family="dlaplace", epsilon=1.0, delta=1e-5, mean_sensitivity=1000, releases=1, mean_fraction=0.5,
         shares_for=80),
    dict(family="dgaussian", epsilon=10.0, delta=1e-6, mean_sensitivity=1000, releases=288, mean_fraction=0.8,
         shares_for=800),
    dict(family="dgaussian", epsilon=10.0, delta=1e-6, mean_sensitivity=1000, releases=288, mean_fraction=0.5,
         shares_for=800),  # the histogram's shares are below 1: KLS21's tau term matters
    dict(family="dgaussian", epsilon=1.0, delta=1e-6, mean_sensitivity=1000, releases=1, mean_fraction=0.5,
         shares_for=8),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['family']}-eps{c['epsilon']}-d{c['delta']}-r{c['releases']}")
def test_calibrate_round_trips_and_more_survivors_never_cost_more(case):
    spec = calibrate(**case)
    t, releases, delta = case["shares_for"], case["releases"], case["delta"]
    spent = epsilon_of([release_event(spec, t)] * releases, delta)
    assert 0.99 * case["epsilon"] <= spent <= case["epsilon"]
    assert calibrate(**case) == spec  # deterministic
    assert NoiseSpec.model_validate_json(spec.model_dump_json()) == spec
    more = [epsilon_of([release_event(spec, n)] * releases, delta) for n in (t, t + 1, 2 * t, 5 * t, 20 * t)]
    assert all(b <= a for a, b in zip(more, more[1:])), more
    with pytest.raises(ValueError, match="survivors"):
        release_event(spec, t - 1)


def test_calibrate_split_and_pure_dp():
    spec = calibrate(family="dlaplace", epsilon=2.0, delta=0, mean_sensitivity=1000, releases=1, mean_fraction=0.5,
                     shares_for=80)
    assert spec.mean_param * 1000 == pytest.approx(1.0) and 2 * spec.hist_param == pytest.approx(1.0)
    assert epsilon_of([release_event(spec, 80)] * 7, 0) == pytest.approx(14.0)  # basic composition, exact
    with pytest.raises(ValueError, match="delta=0"):
        calibrate(family="dgaussian", epsilon=1, delta=0, mean_sensitivity=10, releases=1, mean_fraction=0.5,
                  shares_for=2)
    with pytest.raises(ValueError, match="family"):
        calibrate(family="laplace", epsilon=1, delta=0, mean_sensitivity=10, releases=1, mean_fraction=0.5,
                  shares_for=2)
    with pytest.raises(ValueError, match="mean_fraction"):
        calibrate(family="dlaplace", epsilon=1, delta=0, mean_sensitivity=10, releases=1, mean_fraction=1.0,
                  shares_for=2)
    assert set(FAMILIES) == {"dlaplace", "dgaussian"}


def test_epsilon_of_groups_identical_events_and_states_the_mix():
    dl = dp_event.DiscreteLaplaceDpEvent(0.01, 100)
    zc = dp_event.ZCDpEvent(0.002)
    assert epsilon_of([dl] * 288, 1e-6) == epsilon_of([dp_event.SelfComposedDpEvent(dl, 288)], 1e-6)
    assert epsilon_of([zc] * 288, 1e-6) == epsilon_of([dp_event.SelfComposedDpEvent(zc, 288)], 1e-6)
    with pytest.raises(ValueError, match="delta"):
        epsilon_of([zc], 0)
    # a mix: each DLap event of pure epsilon e becomes ZCDpEvent(e^2 / 2); the RDP accountant composes all
    mixed = epsilon_of([dl] * 10 + [zc] * 100, 1e-6)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.ZCDpEvent(1.0**2 / 2), 10))
    acc.compose(dp_event.SelfComposedDpEvent(zc, 100))
    assert mixed == pytest.approx(acc.get_epsilon(1e-6))
    assert mixed >= max(epsilon_of([dl] * 10, 1e-6), epsilon_of([zc] * 100, 1e-6))
    with pytest.raises(ValueError, match="unsupported"):
        epsilon_of([dp_event.GaussianDpEvent(1.0)], 1e-6)


def test_noise_sd_matches_the_laws():
    spec = _spec("dlaplace", 0.5, 0.2, t=10)
    q = math.exp(-0.5)
    assert noise_sd(spec, 10)[0] == pytest.approx(math.sqrt(2 * q / (1 - q) ** 2))
    assert noise_sd(spec, 40)[0] == pytest.approx(2 * noise_sd(spec, 10)[0])  # sqrt(n / t)
    g = _spec("dgaussian", 400.0, 30.0, t=16)
    assert noise_sd(g, 16) == pytest.approx((400.0, 30.0))


# ---------------------------------------------------------------------------------------------------
# The default source is cryptographic; numpy's generators are never used
# ---------------------------------------------------------------------------------------------------
def test_default_rng_is_system_random_and_numpy_random_is_never_used(monkeypatch):
    assert isinstance(secnoise._CSPRNG, random.SystemRandom)
    tree = ast.parse(Path(secnoise.__file__).read_text())
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "numpy" for m in imports), imports

    def boom(*args, **kwargs):
        raise AssertionError("numpy.random used")

    for name in dir(np.random):
        if not name.startswith("_") and callable(getattr(np.random, name)):
            monkeypatch.setattr(np.random, name, boom)

    class Counting(random.SystemRandom):
        calls = 0

        def random(self):
            Counting.calls += 1
            return super().random()

    monkeypatch.setattr(secnoise, "_CSPRNG", Counting())
    for family in FAMILIES:
        spec = _spec(family, 50.0 if family == "dgaussian" else 0.01, 3.0 if family == "dgaussian" else 0.5, t=5,
                     n_hist=20)
        before = Counting.calls
        assert len(sample_share(spec, 20)) == 21
        assert Counting.calls > before
    before = Counting.calls
    assert 0 <= quantize(42.42, 100) <= 10_000
    assert Counting.calls == before + 1
    spec = calibrate(family="dgaussian", epsilon=3, delta=1e-6, mean_sensitivity=100, releases=4, mean_fraction=0.7,
                     shares_for=5)
    fleet_estimate([5] * 20, spec=spec, survivors=100, edges=EDGES)
    fleet_mean(4000, spec=spec, survivors=100, scale=1)


# ---------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 3.14159, 37.123456, 99.99, 100.0])
def test_quantize_is_unbiased_and_in_range(value):
    scale, n = 10, 20_000
    rng = random.Random(int(value * 1000))
    draws = np.array([quantize(value, scale, rng) for _ in range(n)])
    assert draws.min() >= 0 and draws.max() <= 100 * scale
    v = value * scale
    frac = v - math.floor(v)
    assert set(np.unique(draws)) <= {math.floor(v), math.ceil(v)}
    assert abs(draws.mean() - v) <= 6 * math.sqrt(frac * (1 - frac) / n) + 1e-12


@pytest.mark.parametrize("value", [-5.0, 1e-300, 100.0 - 1e-13, 150.0])
def test_quantize_clips_to_the_cpu_bounds(value):
    for seed in range(50):
        assert 0 <= quantize(value, 100, random.Random(seed)) <= 10_000
    with pytest.raises(ValueError, match="finite"):
        quantize(float("nan"), 10)
    with pytest.raises(ValueError, match="scale"):
        quantize(1.0, 0)


# ---------------------------------------------------------------------------------------------------
# Fleet estimates: coverage of the 95 % intervals over simulated fleets
# ---------------------------------------------------------------------------------------------------
REPS = 1000
BINOMIAL_6SD = 6 * math.sqrt(0.95 * 0.05 / REPS)  # 0.041


def _fleet(kind: str, k: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "idle":  # around 3 %, 5 % of members with a spike of 5-60 %
        x = rng.gamma(2.0, 1.5, k) + (rng.random(k) < 0.05) * rng.uniform(5, 60, k)
    else:  # bimodal: 60 % idle around 12 %, 40 % busy around 88 %
        x = np.where(rng.random(k) < 0.6, rng.normal(12, 4, k), rng.normal(88, 6, k))
    return np.clip(x, 0, 100)


def _summed_noise(spec: NoiseSpec, n: int, size: int, param: float, rng: np.random.Generator) -> np.ndarray:
    """The exact law of the sum of n dlaplace shares: NB(n/t, q) - NB(n/t, q) (the shares' own law is tested above)."""
    q = math.exp(-param)
    return rng.negative_binomial(n / spec.shares_for, 1 - q, size) - rng.negative_binomial(n / spec.shares_for, 1 - q,
                                                                                              size)


def _window_spec(k: int) -> NoiseSpec:
    """The whole-window unit: epsilon 1 on the mean, 1 on the histogram, shares for 80 % of the cohort."""
    return calibrate(family="dlaplace", epsilon=2.0, delta=0, mean_sensitivity=1000, releases=1, mean_fraction=0.5,
                     shares_for=int(0.8 * k))


@pytest.mark.parametrize("kind", ["idle", "bimodal"])
@pytest.mark.parametrize("k", [100, 1000])
def test_fleet_intervals_cover(kind, k):
    """Percentiles: coverage >= 95 % by construction (each side fails only with its bound at one edge), so the
    observed rate must be >= 0.95 - 6 binomial sd; it is above 95 % when the bin width, not the noise, decides.
    Share above 90 %: a linear statistic, 95 % up to the normal approximation, so within 0.95 +- 6 sd (except where
    the true share is 0 and the clipped interval is one-sided: then >= only)."""
    spec = _window_spec(k)
    rng = np.random.default_rng([7, k, len(kind)])
    covered = Counter()
    for _ in range(REPS):
        x = _fleet(kind, k, rng)
        counts, _ = np.histogram(x, bins=EDGES)
        noisy = counts + _summed_noise(spec, k, 20, spec.hist_param, rng)
        est = fleet_estimate(noisy.tolist(), spec=spec, survivors=k, edges=EDGES)
        xs = np.sort(x)
        for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            iv = est["percentiles"][name]
            truth = xs[math.ceil(p * k) - 1]  # the smallest value with at least p k members at or below it
            covered[name] += iv.low <= truth <= iv.high
            assert iv.low <= iv.estimate <= iv.high
        share = float(np.mean(x >= 90))
        covered["share"] += est["share_above"].low <= share <= est["share_above"].high
    rates = {name: c / REPS for name, c in covered.items()}
    for name in ("p50", "p90", "p99"):
        assert rates[name] >= 0.95 - BINOMIAL_6SD, rates
    assert rates["share"] >= 0.95 - BINOMIAL_6SD, rates
    if kind == "bimodal":
        assert rates["share"] <= 0.95 + BINOMIAL_6SD, rates


def test_fleet_mean_interval_covers():
    """Network mean at the whole-window unit, k = 100 (t = 80): coverage within 0.95 +- 6 binomial sd over 2,000
    fleets, from the quantized values and the exact law of the summed noise."""
    k, scale, reps = 100, 10, 2000
    spec = _window_spec(k)
    rng, qrng = np.random.default_rng(8), random.Random(8)
    hits = 0
    for _ in range(reps):
        x = _fleet("bimodal", k, rng)
        noise = int(_summed_noise(spec, k, 1, spec.mean_param, rng)[0])
        total = sum(quantize(float(v), scale, qrng) for v in x) + noise
        iv = fleet_mean(total, spec=spec, survivors=k, scale=scale)
        hits += iv.low <= float(x.mean()) <= iv.high
    assert abs(hits / reps - 0.95) <= 6 * math.sqrt(0.95 * 0.05 / reps)


def test_fleet_estimate_without_noise_to_speak_of():
    spec = _spec("dlaplace", 0.001, 60.0, t=10, n_hist=20)  # a_h = 60: the counts are exact (P(noise != 0) ~ 1e-26)
    counts = [0] * 20
    counts[8] = 30  # 30 members in [40, 45)
    counts[19] = 10  # 10 members in [95, 100]
    est = fleet_estimate(counts, spec=spec, survivors=40, edges=EDGES)
    assert (est["percentiles"]["p50"].low, est["percentiles"]["p50"].high) == (40.0, 45.0)
    assert (est["percentiles"]["p99"].low, est["percentiles"]["p99"].high) == (95.0, 100.0)
    share = est["share_above"]
    assert share.estimate == pytest.approx(0.25) and share.high - share.low < 1e-9
    inside = fleet_estimate(counts, spec=spec, survivors=40, edges=EDGES, threshold=92.5)
    assert inside["share_above"].low == pytest.approx(0.25) and inside["share_above"].high == pytest.approx(0.25)
    with pytest.raises(ValueError, match="survivors"):
        fleet_estimate(counts, spec=spec, survivors=9, edges=EDGES)
    with pytest.raises(ValueError, match="edges"):
        fleet_estimate(counts, spec=spec, survivors=40, edges=EDGES[::-1])
    with pytest.raises(ValueError, match="counts"):
        fleet_estimate(counts[:-1], spec=spec, survivors=40, edges=EDGES)


def test_kls_tau_term_is_charged_to_the_histogram_and_never_understated():
    """With t = 8,000 the histogram's shares have sigma^2 / t ~ 0.1 and KLS21's tau term is large: the histogram
    gets more noise, the mean's sigma stays what its share of rho gives (as at t = 800), and the round trip holds.
    Beyond 1,000 terms tau is bounded above, never below the exact sum."""
    common = dict(family="dgaussian", epsilon=10.0, delta=1e-6, mean_sensitivity=10_000, releases=288,
                  mean_fraction=0.8)
    small, large = calibrate(**common, shares_for=800), calibrate(**common, shares_for=8000)
    assert large.mean_param == pytest.approx(small.mean_param, rel=1e-3)
    assert large.hist_param > 2 * small.hist_param
    spent = epsilon_of([release_event(large, 8000)] * 288, 1e-6)
    assert 0.99 * 10 <= spent <= 10
    with pytest.raises(ValueError, match="1/4"):  # shares below KLS21's sigma >= 1/2
        release_event(_spec("dgaussian", 1.0, 50.0, t=8), 8)
    for c in (0.5, 2.0, 5.0):
        for m in (1001, 1500, 8000):
            exact = 10 * math.fsum(math.exp(-c * k / (k + 1)) for k in range(1, m))
            assert exact <= secnoise._tau(c, m) <= exact * (1 + 1e-4)


def test_percentile_interval_is_tight_for_the_least_favourable_fleet():
    """The percentile bound is not needlessly wide. Its guarantee (each side fails with probability <= 2.5 %) is
    nearly attained by a fleet whose counts sit one member either side of p n at the two edges around the median and
    far from it elsewhere, on 1-point bins (100 bins: adjacent cumulative counts then share most of their noise, so
    a side fails almost as often as its one bound): 49 members in [44, 45), 1 in [45, 46), 50 in [46, 47). Coverage
    over 2,000 noisy histograms: 95 % within 6 binomial sd. Generic fleets cover more: their counts clear p n by a
    margin at the edges, and coarse bins decorrelate adjacent bounds."""
    k, reps, m = 100, 2000, 100
    spec = calibrate(family="dlaplace", epsilon=2.0, delta=0, mean_sensitivity=1000, releases=1, mean_fraction=0.5,
                     shares_for=80, n_hist=m)
    edges = [float(i) for i in range(m + 1)]
    counts = np.zeros(m, dtype=int)
    counts[44], counts[45], counts[46] = 49, 1, 50  # the 50th smallest value is in [45, 46)
    rng = np.random.default_rng(9)
    hits = 0
    for _ in range(reps):
        noisy = counts + _summed_noise(spec, k, m, spec.hist_param, rng)
        iv = fleet_estimate(noisy.tolist(), spec=spec, survivors=k, edges=edges)["percentiles"]["p50"]
        hits += iv.low <= 45.5 <= iv.high
    assert abs(hits / reps - 0.95) <= 6 * math.sqrt(0.95 * 0.05 / reps), hits / reps


# ---------------------------------------------------------------------------------------------------
# The plausibility check: its limits hold the noise's exact tails, and honest rounds are refused at most at its rate
# ---------------------------------------------------------------------------------------------------
def _nb_difference_tail(r: float, a: float, y: float) -> float:
    """P(|Z| > y) for Z = NB(r, q) - NB(r, q), q = e^-a, summed from the exact pmf (log-gamma) well into the tail."""
    from scipy.special import gammaln

    q = math.exp(-a)
    size = int(y + 80 / a) + 10
    j = np.arange(size)
    p = np.exp(gammaln(j + r) - gammaln(r) - gammaln(j + 1) + r * math.log1p(-q) + j * math.log(q))
    positive = np.correlate(p, p, "full")[size - 1:]  # P(Z = z), z >= 0 (the rest of the sum is below e^-80)
    return 2 * math.fsum(positive[math.floor(y) + 1:])


@pytest.mark.parametrize("r", [1.0, 1.82, 4.0])
@pytest.mark.parametrize("a, weights", [(0.125, [0.0, 1.0]), (0.01, [1.0]), (0.125, [0.0] + [1.0] * 20)])
def test_noise_tail_is_the_exact_tail_of_the_discrete_laplace_sum(r, a, weights):
    """The limit for one coordinate (and for the sum of 20 bins: NB(20 r, q) - NB(20 r, q)) is the least integer
    whose exact two-sided tail (the pmf summed with log-gamma, another way than the code's) is <= the rate."""
    t = 100
    spec = _spec("dlaplace", a, a, t=t, n_hist=20)
    shape = r * max(1, sum(1 for w in weights[1:] if w))
    for rate in (1e-3, 1e-6 / 23):
        y = secnoise.noise_tail(spec, round(r * t), weights, rate)
        assert y == int(y) and _nb_difference_tail(shape, a, y) <= rate < _nb_difference_tail(shape, a, y - 1)


def test_noise_tail_bounds_a_weighted_sum_by_chernoff():
    """Mean against histogram (unequal weights): a bound, never below the exact tail of any one of its terms, and
    for the Gaussian case sqrt(2 V log(2 / rate))."""
    spec = _spec("dlaplace", 0.01, 0.125, t=50, n_hist=20)
    centres = [2.5 + 5 * i for i in range(20)]
    y = secnoise.noise_tail(spec, 50, [1.0] + [-c for c in centres], 1e-6)
    assert y >= 97.5 * secnoise.noise_tail(spec, 50, [0.0] * 20 + [1.0], 1e-6)
    g = _spec("dgaussian", 30.0, 4.0, t=10, n_hist=2)
    v = 20 * (30.0**2 + 2 * 4.0**2) / 10
    assert secnoise.noise_tail(g, 20, [1.0, 1.0, -1.0], 1e-6) == pytest.approx(math.sqrt(2 * v * math.log(2e6)))


@pytest.mark.parametrize("s2", [0.3, 0.84, 2.0, 30.0])
def test_the_discrete_gaussian_is_subgaussian_as_noise_tail_assumes(s2):
    """noise_tail bounds the discrete Gaussian's moment generating function by e^(l^2 s2 / 2) (CKS20): checked by
    summing it over the support (in logs), where the discrete law differs most from the continuous one (small s2)."""
    xs = np.arange(-int(60 * math.sqrt(s2)) - 60, int(60 * math.sqrt(s2)) + 61).astype(float)
    log_w = -xs**2 / (2 * s2)
    log_z = float(np.logaddexp.reduce(log_w))
    for lam in (0.01, 0.1, 0.5, 1.0, 2.0, 4.0 / math.sqrt(s2)):
        assert float(np.logaddexp.reduce(log_w + lam * xs)) - log_z <= lam * lam * s2 / 2 + 1e-12


def _honest_total(x: np.ndarray, edges: list[float], noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An honest round's sum: the members' stochastically rounded means (scale 1) and bin counts, plus ``noise``."""
    counts = np.histogram(x, bins=edges)[0]
    return np.concatenate([[np.floor(x + rng.random(len(x))).sum()], counts]).astype(np.int64) + noise


def test_honest_rounds_are_refused_at_most_at_the_stated_rate():
    """At a rate one can count (2 %), over 5,000 honest rounds with exactly t survivors (the summed noise is then
    exactly DLap: the heaviest tails a published round has), refusals stay within rate * N + 6 binomial sd."""
    spec, rate, rounds = _spec("dlaplace", 0.01, 0.125, t=50, n_hist=20, sens=100), 0.02, 5000
    rng, q = np.random.default_rng(21), np.exp(-np.array([0.01] + [0.125] * 20))
    refused = 0
    for _ in range(rounds):
        noise = rng.negative_binomial(1.0, 1 - q) - rng.negative_binomial(1.0, 1 - q)
        total = _honest_total(_fleet("bimodal", 50, rng), EDGES, noise, rng)
        refused += secnoise.implausibility(total.tolist(), spec=spec, survivors=50, scale=1, edges=EDGES,
                                           rate=rate) is not None
    assert refused <= rate * rounds + 6 * math.sqrt(rate * (1 - rate) * rounds)


def test_honest_rounds_at_the_defaults_are_not_refused():
    """The aggregator's own check (``secure.implausible``) on the epoch it plans for 1,000 members at the whole-window
    unit, over 20,000 honest rounds with t = 550 survivors: none refused (the bound says P(any) <= 20,000 * 1e-6 = 2 %;
    the 6-sigma rule this replaces refused about 0.06 % of them, a dozen, because 6 sd of a discrete Laplace is only
    8.5 of its scales: e^-8.5 = 2e-4 per coordinate)."""
    import base64
    from datetime import datetime, timezone

    from cpu_tracker_aggregator.secure import implausible, plan_epoch
    from shared.settings import Settings

    keys = {f"m{i:04d}@example.org": base64.b64encode(bytes([i % 256]) * 32).decode() for i in range(1000)}
    epoch = plan_epoch(1, keys, Settings(aggregator="agg@example.org", mode="secure"), "agg@example.org", 0,
                       datetime(2026, 1, 1, tzinfo=timezone.utc))
    t, spec, edges = epoch.noise.shares_for, epoch.noise, epoch.bin_edges()
    assert spec.family == "dlaplace" and t == 550
    rng = np.random.default_rng(22)
    q = np.exp(-np.array([spec.mean_param] + [spec.hist_param] * epoch.bins))
    refused = []
    for _ in range(20_000):
        noise = rng.negative_binomial(1.0, 1 - q) - rng.negative_binomial(1.0, 1 - q)
        why = implausible(_honest_total(_fleet("idle", t, rng), edges, noise, rng), epoch, t)
        if why:
            refused.append(why)
    assert refused == []


def test_each_plausibility_check_catches_what_it_is_for():
    """An honest sum passes, also with each part at the edge of its limit; one step beyond a limit (a member adding
    garbage there) is refused with the reason named. The histogram is precise here (a_h = 2) so that the mean against
    histogram check has room inside the mean's range."""
    spec, n = _spec("dlaplace", 0.01, 2.0, t=50, n_hist=20, sens=100), 60
    counts = [0] * 20
    counts[0], counts[17] = 30, 30  # 30 members near 2.5 %, 30 near 87.5 %: the centres sum to 2,700 points
    honest = [2700] + counts
    check = lambda total: secnoise.implausibility(total, spec=spec, survivors=n, scale=1, edges=EDGES)  # noqa: E731
    assert check(honest) is None
    y_mean, y_bin, y_sum, y_both = secnoise._plausible_limits(spec, n, 1, tuple(EDGES), secnoise.FALSE_REFUSAL)
    assert "mean coordinate" in check([100 * n + int(y_mean) + 1] + counts)
    assert "mean coordinate" in check([-int(y_mean) - 1] + counts)
    assert "histogram count" in check([2700, -int(y_bin) - 1] + counts[1:])
    assert "histogram count" in check([2700] + counts[:5] + [n + int(y_bin) + 1] + counts[6:])
    moved = int(y_bin)  # a count at the edge of its limit, the others unchanged in sum
    assert check([2700, 30 - moved] + counts[1:5] + [moved] + counts[6:]) is None
    assert "add up" in check([2700] + [c + (int(y_sum) // 10 + 1 if i < 10 else 0) for i, c in enumerate(counts)])
    edge = 2700 + int(n * (2.5 + 1) + y_both)  # half the widest bin and the rounding per member, plus the noise
    assert edge + 1 <= 100 * n  # inside the mean's own range: only the histogram can tell
    assert check([edge] + counts) is None
    assert "disagrees with the histogram" in check([edge + 1] + counts)
    with pytest.raises(ValueError, match="coordinates"):
        check(honest[:-1])


def test_a_figure_the_cohort_is_too_small_for_is_named():
    """With 5 members the noise spans the whole range: every percentile and the share above 90 % are named as
    uninformative; with the counts nearly exact, none is."""
    spec = calibrate(family="dlaplace", epsilon=1.25, delta=0, mean_sensitivity=100, releases=1, mean_fraction=0.8,
                     shares_for=4)
    counts = [0] * 20
    counts[10] = 5
    est = fleet_estimate(counts, spec=spec, survivors=5, edges=EDGES)
    assert set(est["cohort_too_small_for"]) == {"p50", "p90", "p99", "share_above"}
    exact = fleet_estimate(counts, spec=_spec("dlaplace", 0.001, 60.0, t=4, n_hist=20), survivors=5, edges=EDGES)
    p50 = exact["percentiles"]["p50"]
    assert exact["cohort_too_small_for"] == [] and (p50.low, p50.high) == (50.0, 55.0)
    assert secnoise.uninformative(Interval(estimate=50, low=5, high=95), 0, 100)
    assert not secnoise.uninformative(Interval(estimate=50, low=6, high=95), 0, 100)


def test_collusion_loss_is_computed_from_the_exact_law():
    """The bench's collusion table (docs/secure-noise.md): with all t shares the noise is exactly DLap(a), whose pure
    epsilon is a * d; each share fewer costs more; half the shares at the whole-window unit take its 1.25 to about 4.1
    (the issue's figure; the README's old sqrt((k - c) / t) would have said 1.77)."""
    from tests.bench.secure_accuracy import _nb_difference_epsilon

    assert _nb_difference_epsilon(1.0, 0.125, 1) == pytest.approx(0.125, rel=1e-9)
    assert _nb_difference_epsilon(1.0, 0.01, 100) == pytest.approx(1.0, rel=1e-9)
    by_share = [_nb_difference_epsilon(r, 0.125, 1) for r in (1.0, 0.75, 0.5, 0.25)]
    assert by_share == sorted(by_share) and by_share[-1] > 2 * by_share[0]
    half = _nb_difference_epsilon(0.5, 0.01, 100) + 2 * _nb_difference_epsilon(0.5, 0.125, 1)
    assert 4.0 <= half <= 4.15
