"""Distributed noise for secure aggregation: its calibration, its accounting, and what the sum tells. Pure: no I/O.

One member's vector for one round is ``[q(mean), one-hot histogram of n_hist bins]`` (integers); each member adds
``sample_share`` to it, and the aggregator learns only the exact sum over the survivors S. Shares are sized for
``t = spec.shares_for`` members: any t of them sum to the total noise (dlaplace: exactly DLap(a); dgaussian: the
distributed discrete Gaussian), so with |S| >= t survivors the sum carries at least that noise.

Neighbouring inputs: one member's data changes (the privacy unit decides how much): its mean coordinate moves by at
most ``mean_sensitivity`` quantized units (L1 = L2, one coordinate), and its histogram moves one count from one bin
to another (e_i - e_j: L1 2, L2 sqrt 2).

- dlaplace (pure DP): DLap(a) on an integer query of L1 sensitivity D is a*D-DP (the geometric mechanism; Ghosh,
  Roughgarden & Sundararajan 2009; Dwork & Roth 2014, Thm 3.6 for its continuous twin). The histogram's change is
  two coordinates of sensitivity 1 each: two DLap(a_h) events (exact, not a bound). Shares: NB(1/t, e^-a) -
  NB(1/t, e^-a), whose sum over t members is DLap(a) (infinite divisibility of the geometric law; the Polya /
  negative-binomial construction of Goryczka & Xiong 2017, used as in Agarwal, Kairouz & Liu 2021 for Skellam).
- dgaussian (zCDP): the sum of n shares N_Z(0, sigma^2 / t) is (rho)-zCDP with
  rho = (||D||_2 / sqrt(n sigma^2 / t) + sqrt(d) * tau)^2 / 2, tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 (sigma^2/t)
  k / (k+1)) (Kairouz, Liu & Steinke 2021, Theorem 1 / Prop. 14, third branch; d = the part's dimension), taken as
  the least over any m in [t, n] of the shares (the others are independent extra noise); the theorem assumes each
  share's sigma / sqrt(t) >= 1/2, which calibrate keeps and release_event checks. Shares:
  exact discrete Gaussian sampler of Canonne, Kamath & Steinke 2020 (Algorithms 1-3), as diffprivlib implements it.

Composition and conversion to (epsilon, delta) are dp-accounting's (PLD accountant for DLap events, RDP accountant
for zCDP events), except for delta = 0: dp-accounting 0.6.0's PLD cannot return a finite epsilon at delta = 0 (its
tail truncation), so pure DP is composed by basic composition, which is exact for pure DP (Dwork & Roth 2014,
Thm 3.16).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from shared.privacy import CPU_BOUNDS, Interval, clip_cpu

FAMILIES = ("dlaplace", "dgaussian")
PLD_DISCRETIZATION = 1e-3  # dp-accounting PLD grid: pessimistic (losses rounded up); 288 releases compose in ~40 ms
DEFAULT_N_HIST = 20

_CSPRNG = random.SystemRandom()  # os.urandom: the default source of every draw here (never numpy's generators)


class NoiseSpec(BaseModel):
    """The noise of one round, carried in the aggregator's epoch file (JSON) and checked by every member."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    family: Literal["dlaplace", "dgaussian"] = Field(description="Noise family of the summed noise.")
    mean_sensitivity: int = Field(ge=1, description="L1 (= L2) sensitivity of the mean coordinate, quantized units.")
    mean_param: float = Field(gt=0, description="dlaplace: a of the total DLap(a); dgaussian: sigma of the total.")
    hist_param: float = Field(gt=0, description="The same for each histogram coordinate (sensitivity L1 2, L2 sqrt 2).")
    shares_for: int = Field(ge=1, description="t: any t member shares together carry the total noise above.")
    n_hist: int = Field(default=DEFAULT_N_HIST, ge=1, description="Histogram bins (the d of the KLS21 tau term).")


# ---------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------
def release_event(spec: NoiseSpec, survivors: int):
    """The dp-accounting event of one release whose sum carries ``survivors`` shares (>= spec.shares_for).

    dlaplace: DLap(a_m) on the mean (sensitivity D) and two DLap(a_h) of sensitivity 1 on the histogram, whatever
    the survivors: the sum of any t shares is exactly DLap(a), the others add independent noise (post-processing),
    so this is conservative for survivors > t. dgaussian: one ZCDpEvent per part with KLS21's rho for n shares (its
    tau term included), never growing with n (the same post-processing argument: more shares never cost more)."""
    from dp_accounting import dp_event

    if survivors < spec.shares_for:
        raise ValueError(f"survivors must be >= shares_for={spec.shares_for}, got survivors={survivors}: "
                         "the sum would carry less noise than the spec promises")
    if spec.family == "dlaplace":
        return dp_event.ComposedDpEvent([
            dp_event.DiscreteLaplaceDpEvent(spec.mean_param, spec.mean_sensitivity),
            dp_event.SelfComposedDpEvent(dp_event.DiscreteLaplaceDpEvent(spec.hist_param, 1), 2),
        ])
    if min(spec.mean_param, spec.hist_param) ** 2 / spec.shares_for < 0.25:
        raise ValueError(f"dgaussian shares need sigma^2 / t >= 1/4 (KLS21 Thm 1 assumes sigma >= 1/2), got "
                         f"mean_param={spec.mean_param}, hist_param={spec.hist_param}, shares_for={spec.shares_for}")
    rho_m = _kls_rho(spec.mean_sensitivity, spec.mean_param, spec.shares_for, survivors, 1)
    rho_h = _kls_rho(math.sqrt(2), spec.hist_param, spec.shares_for, survivors, spec.n_hist)
    return dp_event.ComposedDpEvent([dp_event.ZCDpEvent(rho_m), dp_event.ZCDpEvent(rho_h)])


_TAU_HEAD = 1000  # tau's first terms summed exactly, the rest bounded above (e^x <= 1 + x e^x, H_m - H_K <= ln(m/K))


def _tau(c: float, m: int) -> float:
    """KLS21's tau for m shares, 10 sum_{k=1}^{m-1} exp(-c k / (k + 1)) with c = 2 pi^2 sigma_local^2; exact for
    m <= 1000, an upper bound beyond (so rho is never understated)."""
    head = math.fsum(math.exp(-c * k / (k + 1)) for k in range(1, min(m, _TAU_HEAD)))
    if m <= _TAU_HEAD:
        return 10.0 * head
    # k = K..m-1: exp(-c) exp(c / (k + 1)) <= exp(-c) (1 + c / (k + 1) exp(c / (K + 1)))
    tail = math.exp(-c) * ((m - _TAU_HEAD) + c * math.exp(c / (_TAU_HEAD + 1)) * math.log(m / _TAU_HEAD))
    return 10.0 * (head + tail)


@lru_cache(maxsize=4096)
def _kls_rho(l2: float, sigma: float, t: int, n: int, dim: int) -> float:
    """rho of the sum of n >= t shares N_Z(0, sigma^2 / t) for an L2 change ``l2``: min over m in [t, n] of KLS21's
    (l2 / sqrt(m sigma^2 / t) + sqrt(dim) tau_m)^2 / 2 (any m of the shares carry the rest as post-processing), so
    it never grows with n although tau_m does."""
    local_var = sigma * sigma / t
    c = 2 * math.pi**2 * local_var
    if 10.0 * n * math.exp(-c / 2) * math.sqrt(dim) < 1e-15 * l2 / math.sqrt(n * local_var):
        return (l2 / math.sqrt(n * local_var)) ** 2 / 2  # tau below a double's resolution for every m <= n
    best = math.inf
    for m in range(t, n + 1) if n - t <= 10_000 else sorted({t, n, *range(t, n + 1, max(1, (n - t) // 10_000))}):
        best = min(best, (l2 / math.sqrt(m * local_var) + math.sqrt(dim) * _tau_cached(c, m)) ** 2 / 2)
    return best


@lru_cache(maxsize=65536)
def _tau_cached(c: float, m: int) -> float:
    return _tau(c, m)


def _sigma_for_rho(l2: float, rho: float, t: int, dim: int) -> float:
    """The least total sigma (to 1e-9 relative) whose KLS21 rho at n = t shares is <= rho, and whose shares have
    sigma / sqrt(t) >= 1/2 (the theorem's assumption)."""
    sigma = max(l2 / math.sqrt(2 * rho), math.sqrt(t) / 2)  # tau = 0
    if _kls_rho(l2, sigma, t, t, dim) <= rho * (1 + 1e-12):
        return sigma
    lo, hi = sigma, sigma * 2
    while _kls_rho(l2, hi, t, t, dim) > rho:
        lo, hi = hi, hi * 2
    while hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if _kls_rho(l2, mid, t, t, dim) <= rho else (mid, hi)
    return hi


def epsilon_of(events: Sequence, delta: float) -> float:
    """Composed epsilon at ``delta`` of ``events`` (a day's releases, say) via dp-accounting.

    Identical events are grouped into one SelfComposedDpEvent and results are cached, so the ledger's call before
    every release is cheap. All DLap: PLD accountant (delta > 0) or basic composition (delta = 0, pure DP, exact).
    All zCDP: RDP accountant (delta > 0 required). A mix: each DLap event of pure epsilon e becomes ZCDpEvent(e^2/2)
    (pure DP implies zCDP, Bun & Steinke 2016, Prop. 1.4) and the RDP accountant composes them all."""
    if not (0 <= delta < 1):
        raise ValueError(f"delta must be in [0, 1), got delta={delta}")
    groups: Counter = Counter()
    for event in events:
        _flatten(event, 1, groups)
    return _epsilon_cached(tuple(sorted(groups.items(), key=repr)), float(delta))


def _flatten(event, count: int, out: Counter) -> None:
    from dp_accounting import dp_event

    if isinstance(event, dp_event.SelfComposedDpEvent):
        _flatten(event.event, count * event.count, out)
    elif isinstance(event, dp_event.ComposedDpEvent):
        for e in event.events:
            _flatten(e, count, out)
    elif isinstance(event, (dp_event.DiscreteLaplaceDpEvent, dp_event.ZCDpEvent)):
        out[event] += count
    else:
        raise ValueError(f"unsupported event {event!r}: expected DiscreteLaplaceDpEvent or ZCDpEvent")


@lru_cache(maxsize=1024)
def _epsilon_cached(groups: tuple, delta: float) -> float:
    from dp_accounting import dp_event, pld, rdp

    if not groups:
        return 0.0
    dlap = [(e, c) for e, c in groups if isinstance(e, dp_event.DiscreteLaplaceDpEvent)]
    if len(dlap) == len(groups):
        if delta == 0:  # pure DP: basic composition is exact (dp-accounting's PLD returns inf at delta = 0)
            return sum(c * e.noise_parameter * e.sensitivity for e, c in dlap)
        acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        for e, c in dlap:
            acc.compose(dp_event.SelfComposedDpEvent(e, c))
        return float(acc.get_epsilon(delta))
    if delta == 0:
        raise ValueError("delta must be > 0 for zCDP (dgaussian) events")
    acc = rdp.RdpAccountant()
    for e, c in groups:
        if isinstance(e, dp_event.DiscreteLaplaceDpEvent):
            e = dp_event.ZCDpEvent((e.noise_parameter * e.sensitivity) ** 2 / 2)
        acc.compose(dp_event.SelfComposedDpEvent(e, c))
    return float(acc.get_epsilon(delta))


def calibrate(*, family: str, epsilon: float, delta: float, mean_sensitivity: int, releases: int,
              mean_fraction: float, shares_for: int, n_hist: int = DEFAULT_N_HIST) -> NoiseSpec:
    """The least noise (to 1 %) such that ``releases`` releases with exactly ``shares_for`` survivors are
    (epsilon, delta)-DP in total by ``epsilon_of``: the spent epsilon is in [0.99 epsilon, epsilon].

    The split: one scalar c sets both parts. dlaplace: c is a release's pure epsilon, a_m * D = mean_fraction * c and
    2 * a_h = (1 - mean_fraction) * c. dgaussian: c is a release's rho, mean_fraction * c on the mean and the rest on
    the histogram (zCDP adds), each part's sigma solved with KLS21's tau term, so a histogram whose shares are small
    (sigma^2 / t < 1, where tau bites) pays for it out of its own part. c is found by a deterministic bracketed
    search against the accountant (to 1 %, unless one step of the PLD grid is larger); delta = 0 is pure DP
    (dlaplace only) and solved in closed form."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got family={family!r}")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be finite and > 0, got epsilon={epsilon}")
    if not (0 <= delta < 1):
        raise ValueError(f"delta must be in [0, 1), got delta={delta}")
    if delta == 0 and family != "dlaplace":
        raise ValueError(f"delta=0 (pure DP) needs family='dlaplace', got family={family!r}")
    if not 0 < mean_fraction < 1:
        raise ValueError(f"mean_fraction must be in (0, 1), got mean_fraction={mean_fraction}")
    if releases < 1 or shares_for < 1 or mean_sensitivity < 1:
        raise ValueError(f"releases, shares_for and mean_sensitivity must be >= 1, got {releases}, {shares_for}, "
                         f"{mean_sensitivity}")

    def spec_for(c: float) -> NoiseSpec:
        if family == "dlaplace":
            m, h = mean_fraction * c / mean_sensitivity, (1 - mean_fraction) * c / 2
        else:  # each part's sigma gives exactly its share of rho, KLS21's tau term included
            m = _sigma_for_rho(mean_sensitivity, mean_fraction * c, shares_for, 1)
            h = _sigma_for_rho(math.sqrt(2), (1 - mean_fraction) * c, shares_for, n_hist)
        return NoiseSpec(family=family, mean_sensitivity=mean_sensitivity, mean_param=m, hist_param=h,
                         shares_for=shares_for, n_hist=n_hist)

    def spent(c: float) -> float:
        return epsilon_of([_self_composed(release_event(spec_for(c), shares_for), releases)], delta)

    if delta == 0:
        return spec_for(epsilon / releases)  # basic composition, exact for pure DP
    # a safe start (dlaplace: pure composition; zCDP: below the rho that eps = rho + 2 sqrt(rho log(1/delta)) gives),
    # halved until safe, doubled until not; then safeguarded regula falsi keeping the safe end, until epsilon is
    # within 1 % (0.2 % for zCDP; PLD's epsilon is a step function of c on its grid, steps ~0.5 %: the bracket's
    # width stops it too)
    lo = epsilon / releases if family == "dlaplace" else epsilon**2 / (8 * releases * (1 + math.log(1 / delta)))
    f_lo = spent(lo) - epsilon
    while f_lo > 0:
        lo /= 2
        f_lo = spent(lo) - epsilon
    hi, f_hi = lo * 2, spent(lo * 2) - epsilon
    while f_hi <= 0:
        lo, f_lo = hi, f_hi
        hi *= 2
        f_hi = spent(hi) - epsilon
    tol = 0.002 if family == "dgaussian" else 0.01  # RDP's epsilon is smooth and cheap; PLD's has steps
    for _ in range(60):
        if f_lo >= -tol * epsilon or hi / lo < 1 + tol / 10:
            break
        mid = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        if not lo + 0.1 * (hi - lo) <= mid <= hi - 0.1 * (hi - lo):  # too near an end: bisect instead
            mid = math.sqrt(lo * hi)
        f_mid = spent(mid) - epsilon
        if f_mid <= 0:
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    return spec_for(lo)


def _self_composed(event, count: int):
    """``count`` repetitions of ``event`` as one dp-accounting event."""
    from dp_accounting import dp_event

    return event if count == 1 else dp_event.SelfComposedDpEvent(event, count)


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------
def sample_share(spec: NoiseSpec, n_hist: int, rng=None) -> list[int]:
    """One member's share: ``[mean noise] + [hist noise] * n_hist``, integers.

    ``rng``: None for the system's cryptographic source (random.SystemRandom, os.urandom); tests may pass a
    random.Random(seed). Never numpy's generators.

    dlaplace: NB(1/t, q) - NB(1/t, q), q = e^-a, each NB a Poisson-Gamma mixture: lambda = gammavariate(1/t, q/(1-q))
    (stdlib), then Poisson(lambda) by Knuth's exact gamma/beta splitting (TAOCP 3.4.1, stdlib gammavariate and
    betavariate; O(log lambda) draws). dgaussian: N_Z(0, sigma^2 / t) by CKS20's exact rejection sampler
    (Bernoulli(exp(-gamma)) of their Algorithm 1 as diffprivlib.mechanisms.base.bernoulli_neg_exp writes it, the
    discrete Laplace of Algorithm 2 with its U + tV decomposition, the rejection of Algorithm 3)."""
    if n_hist != spec.n_hist:
        raise ValueError(f"n_hist must equal spec.n_hist={spec.n_hist}, got n_hist={n_hist}")
    rng = _CSPRNG if rng is None else rng
    t = spec.shares_for
    if spec.family == "dlaplace":
        draw = _nb_difference
        params = (spec.mean_param, spec.hist_param)
        args = (1.0 / t,)
    else:
        draw = _discrete_gaussian
        params = (spec.mean_param**2 / t, spec.hist_param**2 / t)
        args = ()
    return [draw(params[0], *args, rng)] + [draw(params[1], *args, rng) for _ in range(n_hist)]


def _nb_difference(a: float, r: float, rng) -> int:
    return _neg_binomial(r, a, rng) - _neg_binomial(r, a, rng)


def _neg_binomial(r: float, a: float, rng) -> int:
    """NB(r, q = e^-a): failures before the r-th success, success probability 1 - q (mean r q / (1 - q)), as
    Poisson(Gamma(r, q / (1 - q))); q / (1 - q) = 1 / expm1(a), exact also for tiny a."""
    return _poisson(rng.gammavariate(r, 1.0 / math.expm1(a)), rng)


def _poisson(mu: float, rng) -> int:
    """Exact Poisson(mu) (Knuth, TAOCP vol. 2, 3.4.1 F): peel Gamma(m) arrival blocks, finish by counting."""
    count = 0
    while mu > 16:
        m = int(mu * 7 / 8)
        x = rng.gammavariate(m, 1.0)  # the m-th arrival time of a unit-rate Poisson process
        if x >= mu:  # the m-th arrival is after mu: the first m - 1 are uniform on [0, x)
            return count + _binomial(m - 1, mu / x, rng)
        count, mu = count + m, mu - x
    arrival = rng.expovariate(1.0)
    while arrival < mu:
        count += 1
        arrival += rng.expovariate(1.0)
    return count


def _binomial(n: int, p: float, rng) -> int:
    """Exact Binomial(n, p) (Knuth, TAOCP vol. 2, 3.4.1 F): split on the median order statistic, a Beta variate."""
    count = 0
    while n > 16:
        a = 1 + n // 2
        x = rng.betavariate(a, n + 1 - a)  # the a-th smallest of n uniforms
        if x >= p:
            n, p = a - 1, p / x
        else:
            count, n, p = count + a, n - a, (p - x) / (1.0 - x)
    return count + sum(rng.random() < p for _ in range(n))


def _bernoulli_exp(gamma: float, rng) -> bool:
    """Bernoulli(exp(-gamma)), gamma >= 0 (CKS20 Algorithm 1; diffprivlib.mechanisms.base.bernoulli_neg_exp)."""
    while gamma > 1:
        gamma -= 1
        if not _bernoulli_exp(1.0, rng):
            return False
    k = 1
    while rng.random() <= gamma / k:
        k += 1
    return k % 2 == 1


def _discrete_laplace(t: int, rng) -> int:
    """P(y) proportional to exp(-|y| / t), integer t >= 1 (CKS20 Algorithm 2 with s = 1)."""
    while True:
        u = rng.randrange(t)
        if not _bernoulli_exp(u / t, rng):
            continue
        v = 0
        while _bernoulli_exp(1.0, rng):
            v += 1
        y = u + t * v
        negative = rng.random() < 0.5
        if negative and y == 0:
            continue
        return -y if negative else y


def _discrete_gaussian(sigma2: float, rng) -> int:
    """N_Z(0, sigma2): P(y) proportional to exp(-y^2 / (2 sigma2)) (CKS20 Algorithm 3)."""
    t = int(math.floor(math.sqrt(sigma2))) + 1
    while True:
        y = _discrete_laplace(t, rng)
        if _bernoulli_exp((abs(y) - sigma2 / t) ** 2 / (2 * sigma2), rng):
            return y


def quantize(value: float, scale: int, rng=None) -> int:
    """Unbiased stochastic rounding of value * scale: floor, plus 1 with the fractional part's probability.

    ``value`` is clipped to ``CPU_BOUNDS`` first (``privacy.clip_cpu``), so the result is in [0, 100 * scale]. Its
    rounding error has mean 0 and variance frac (1 - frac) <= 1/4 quantized units^2. Sensitivity: it is floor(v + U),
    U uniform; with one U for two values, the results are at most ceil(|v - v'|) apart, so by joint convexity the noise
    sized for ``mean_sensitivity = ceil(sensitivity in points * scale)`` covers the rounding too."""
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got value={value}")
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(f"scale must be an integer >= 1, got scale={scale!r}")
    rng = _CSPRNG if rng is None else rng
    v = clip_cpu(value) * scale
    low = math.floor(v)
    return min(low + (rng.random() < v - low), int(CPU_BOUNDS[1]) * scale)


# ---------------------------------------------------------------------------------------------------
# What the sum tells
# ---------------------------------------------------------------------------------------------------
def noise_sd(spec: NoiseSpec, survivors: int) -> tuple[float, float]:
    """Exact standard deviation of the summed noise of ``survivors`` shares: (mean coordinate, each hist coordinate),
    quantized units. dlaplace: sum of n shares is NB(n/t, q) - NB(n/t, q), variance 2 (n/t) q / (1 - q)^2.
    dgaussian: n times the variance of N_Z(0, sigma^2 / t) (summed exactly for small sigma, sigma^2 otherwise)."""
    if survivors < 1:
        raise ValueError(f"survivors must be >= 1, got survivors={survivors}")
    return tuple(math.sqrt(survivors * _share_var(spec, p)) for p in (spec.mean_param, spec.hist_param))


def _share_var(spec: NoiseSpec, param: float) -> float:
    t = spec.shares_for
    if spec.family == "dlaplace":  # 2 q / (1 - q)^2 = 2 e^a / expm1(a)^2
        return 2 * math.exp(param) / (t * math.expm1(param) ** 2)
    return _dgauss_moments(param * param / t)[0]


@lru_cache(maxsize=256)
def _dgauss_moments(s2: float) -> tuple[float, float]:
    """(variance, fourth cumulant) of N_Z(0, s2), summed over its support (s2 >= 100: those of N(0, s2), whose
    deficit, below s2 * 4 pi^2 s2 exp(-2 pi^2 s2), is nothing in a double)."""
    if s2 >= 100:
        return s2, 0.0
    w = [math.exp(-x * x / (2 * s2)) for x in range(int(40 * math.sqrt(s2)) + 40)]
    z = w[0] + 2 * math.fsum(w[1:])
    m2 = 2 * math.fsum(x**2 * wx for x, wx in enumerate(w)) / z
    m4 = 2 * math.fsum(x**4 * wx for x, wx in enumerate(w)) / z
    return m2, m4 - 3 * m2 * m2


def _excess_kurtosis(spec: NoiseSpec, param: float, survivors: int) -> float:
    """Excess kurtosis of one coordinate's summed noise of n shares (cumulants add): dlaplace
    (1 + 4q + q^2) / (2 (n/t) q) from those of NB(r, q); dgaussian kappa4 / (n var^2) of the share's law."""
    if spec.family == "dgaussian":
        var, kappa4 = _dgauss_moments(param * param / spec.shares_for)
        return kappa4 / (survivors * var * var)
    q = math.exp(-param)
    return (1 + 4 * q + q * q) / (2 * survivors / spec.shares_for * q)


def _z(level: float, kurtosis: float) -> float:
    """Two-sided normal quantile for ``level``, widened by Cornish-Fisher for a symmetric law of excess kurtosis
    ``kurtosis`` (z + (z^3 - 3 z) k / 24; never narrowed), and never beyond Chebyshev's 1 / sqrt(1 - level), which
    holds for any symmetric law (a nearly degenerate one has a huge kurtosis and a tiny sd)."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return min(z + max(0.0, (z**3 - 3 * z) * kurtosis / 24), 1 / math.sqrt(1 - level))


UNINFORMATIVE_SPAN = 0.9  # an interval over 90 % of the range or more: a number there would mislead


def uninformative(iv: Interval, low: float, high: float) -> bool:
    """True when ``iv`` spans at least UNINFORMATIVE_SPAN of [low, high]: the noise leaves the figure unknown."""
    return iv.high - iv.low >= UNINFORMATIVE_SPAN * (high - low) - 1e-9


def mean_standard_error(spec: NoiseSpec, survivors: int, scale: int) -> float:
    """Standard deviation (points) of the network mean from the secure sum: the noise plus the stochastic rounding."""
    return _mean_sum_sd(noise_sd(spec, survivors)[0], survivors) / (survivors * scale)


def _mean_sum_sd(sd_noise: float, survivors: int) -> float:
    """The summed mean coordinate's sd: the noise's and the rounding's, at most 1/4 unit^2 per member."""
    return math.sqrt(sd_noise**2 + survivors / 4)


def fleet_mean(mean_sum: int, *, spec: NoiseSpec, survivors: int, scale: int, confidence: float = 0.95) -> Interval:
    """Network mean (points) from the secure sum of the mean coordinates, with its interval: the noise's exact sd
    plus the stochastic rounding's (at most 1/4 unit^2 per member, taken at that bound), a normal quantile widened
    by Cornish-Fisher for the noise's kurtosis."""
    _check_survivors(spec, survivors)
    sd_noise = noise_sd(spec, survivors)[0]
    sd = _mean_sum_sd(sd_noise, survivors)
    kurt = _excess_kurtosis(spec, spec.mean_param, survivors) * (sd_noise / sd) ** 4
    half = _z(confidence, kurt) * sd / (survivors * scale)
    est = mean_sum / (survivors * scale)
    return Interval(estimate=est, low=est - half, high=est + half)


def fleet_estimate(hist_sum: Sequence[int], *, spec: NoiseSpec, survivors: int, edges: Sequence[float],
                   threshold: float = 90.0, confidence: float = 0.95) -> dict[str, Any]:
    """DP fleet percentiles and the share at or above ``threshold`` from the noisy histogram sum (post-processing), as
    the fields of the published figure that hold them, by their names in its one model
    (``shared.wire.schema.SecureFigure``): ``percentiles`` (p50, p90, p99: an ``Interval`` each, points),
    ``share_above`` (an ``Interval``, a fraction), ``threshold``, and ``cohort_too_small_for`` (those of the four whose
    interval spans at least ``UNINFORMATIVE_SPAN`` of its range: the cohort is too small for them).

    Counts: with the total known exactly (n survivors, one count each), the best linear estimate of the number of
    members below edge j is G_j = S_j + (j/m)(n - S_m) (S_j: noisy count of the j first bins, m bins), whose noise
    has variance v j (m - j) / m (v: one bin's), never more than m v / 4. A bound at edge j is G_j -+ z_j sd_j, z_j
    the normal quantile of ``confidence`` (each side (1 - confidence) / 2) widened by Cornish-Fisher for the noise's
    kurtosis (DLap's tails are heavier than normal's).

    Percentile p: since "fewer than p n below e_j" implies the percentile is >= e_j and its negation <= e_j, the
    interval is [e_lo, e_hi], e_lo the last edge of the run from 0 whose upper bounds are all below p n, e_hi the
    first edge of the run to 100 whose lower bounds are all >= p n. Each side fails only if the one bound at the edge
    next to the true percentile fails: coverage >= ``confidence``, near it when the noise spans several bins, up to
    100 % when the percentile's bin is certain: the interval is then that bin, and the bin width is the resolution
    (an interval cannot be narrower than a bin without guessing where in the bin the members are). The estimate
    interpolates the monotone estimated counts linearly inside the bin. Share: (n - G_J) / n -+ z sd_J / n at the
    edge J = threshold (exact level up to the normal approximation); a threshold inside a bin widens it to that bin.
    """
    _check_survivors(spec, survivors)
    m = len(hist_sum)
    edges = [float(e) for e in edges]
    if m != spec.n_hist or len(edges) != m + 1:
        raise ValueError(f"need spec.n_hist={spec.n_hist} counts and one more edge, got {m} counts, {len(edges)} edges")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must increase strictly, got {edges}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got confidence={confidence}")
    n = survivors
    sd_bin = noise_sd(spec, survivors)[1]
    kurt_bin = _excess_kurtosis(spec, spec.hist_param, survivors)
    s = [0.0]
    for h in hist_sum:
        s.append(s[-1] + h)
    g = [s[j] + j / m * (n - s[m]) for j in range(m + 1)]
    sd = [sd_bin * math.sqrt(j * (m - j) / m) for j in range(m + 1)]
    z = [_z(confidence, kurt_bin * (j * (1 - j / m) ** 4 + (m - j) * (j / m) ** 4) / (j * (m - j) / m) ** 2)
         if 0 < j < m else 0.0 for j in range(m + 1)]
    upper = [g[j] + z[j] * sd[j] for j in range(m + 1)]
    lower = [g[j] - z[j] * sd[j] for j in range(m + 1)]
    mono = [0.0] * (m + 1)  # clipped to [0, n], then running max: a CDF
    for j in range(1, m + 1):
        mono[j] = max(mono[j - 1], min(max(g[j], 0.0), float(n)))
    mono[m] = float(n)

    def percentile(p: float) -> Interval:
        target = p * n
        lo = 0
        while lo + 1 <= m and upper[lo + 1] < target:
            lo += 1
        hi = m
        while hi - 1 >= 0 and lower[hi - 1] >= target:
            hi -= 1
        j = next(j for j in range(1, m + 1) if mono[j] >= target)
        frac = (target - mono[j - 1]) / (mono[j] - mono[j - 1]) if mono[j] > mono[j - 1] else 0.5
        est = edges[j - 1] + frac * (edges[j] - edges[j - 1])
        return Interval(estimate=min(max(est, edges[lo]), edges[hi]), low=edges[lo], high=edges[hi])

    figures = {"p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99),
               "share_above": _share_above(threshold, edges, g, sd, z, n)}
    vague = tuple(name for name, iv in figures.items()
                  if uninformative(iv, *((0.0, 1.0) if name == "share_above" else (edges[0], edges[-1]))))
    return {"percentiles": {q: figures[q] for q in ("p50", "p90", "p99")}, "share_above": figures["share_above"],
            "threshold": threshold, "cohort_too_small_for": list(vague)}


def _share_above(threshold: float, edges: list[float], g: list[float], sd: list[float], z: list[float],
                 n: int) -> Interval:
    m = len(edges) - 1
    below = max((j for j in range(m + 1) if edges[j] <= threshold + 1e-9), default=0)
    above = min((j for j in range(m + 1) if edges[j] >= threshold - 1e-9), default=m)

    def frac(x: float) -> float:
        return min(max(x / n, 0.0), 1.0)

    high = frac(n - g[below] + z[below] * sd[below])
    low = frac(n - g[above] - z[above] * sd[above])
    if below == above:
        est = frac(n - g[below])
    else:
        w = (threshold - edges[below]) / (edges[above] - edges[below])
        est = frac(n - ((1 - w) * g[below] + w * g[above]))
    return Interval(estimate=min(max(est, low), high), low=low, high=high)


# ---------------------------------------------------------------------------------------------------
# What an honest round's sum can be: the plausibility check, from the exact law of the noise
# ---------------------------------------------------------------------------------------------------
FALSE_REFUSAL = 1e-6  # the most often an honest round is refused: every check together, by the union bound


def noise_tail(spec: NoiseSpec, survivors: int, weights: Sequence[float], rate: float) -> float:
    """A y with P(|sum_i w_i N_i| > y) <= ``rate`` for the noise of ``survivors`` shares, N_0 the mean coordinate's and
    N_1.. the histogram's (``weights`` in that order), from the noise's exact law.

    dlaplace: N_i = NB(r, q) - NB(r, q) exactly (r = survivors / t, q = e^-a), and a sum of j coordinates of one
    parameter is NB(j r, q) - NB(j r, q); for such a sum (equal weights) y is the least integer whose exact two-sided
    tail is <= rate (``_nb_difference_limit``). Otherwise the Chernoff bound: P(Y >= y) <= exp(K(l) - l y) for every
    l > 0, K the sum of the coordinates' cumulant generating functions K_i(l w_i), so y = inf_l (K(l) + log(2 / rate))
    / l (the noise is symmetric); for NB differences K(l) = r (2 log(1 - q) - log(1 - q e^l) - log(1 - q e^-l)),
    |l| < a, and the objective is unimodal in l (its derivative's numerator l K' - K - log(2 / rate) increases from
    below 0): golden section. dgaussian: each share is N_Z(0, s^2), s^2 = sigma^2 / t, whose moment generating function
    is at most the continuous Gaussian's, e^(l^2 s^2 / 2) (Canonne, Kamath & Steinke 2020: it is s^2-subgaussian), so
    y = sqrt(2 V log(2 / rate)) with V = survivors * sum_i w_i^2 s_i^2."""
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got rate={rate}")
    if survivors < 1:
        raise ValueError(f"survivors must be >= 1, got survivors={survivors}")
    params = [spec.mean_param] + [spec.hist_param] * spec.n_hist
    terms = [(p, float(w)) for p, w in zip(params, weights) if w]
    if not terms:
        return 0.0
    log_inv = math.log(2 / rate)
    if spec.family == "dgaussian":
        v = survivors * math.fsum(w * w * p * p / spec.shares_for for p, w in terms)
        return math.sqrt(2 * v * log_inv)
    r = survivors / spec.shares_for
    if len({(p, abs(w)) for p, w in terms}) == 1:
        p, w = terms[0]
        return abs(w) * _nb_difference_limit(r * len(terms), p, rate)
    l_max = min(p / abs(w) for p, w in terms)

    def objective(u: float) -> float:  # u = l / l_max in (0, 1)
        lam = u * l_max
        k = math.fsum(r * (2 * math.log1p(-math.exp(-p)) - math.log1p(-math.exp(lam * abs(w) - p))
                           - math.log1p(-math.exp(-lam * abs(w) - p))) for p, w in terms)
        return (k + log_inv) / lam

    lo, hi = 0.0, 1.0
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = objective(a), objective(b)
    while hi - lo > 1e-12:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = objective(b)
    return min(fa, fb)


@lru_cache(maxsize=1024)
def _nb_difference_limit(r: float, a: float, rate: float) -> int:
    """The least integer y with P(|Z| > y) <= rate for Z = NB(r, q) - NB(r, q), q = e^-a, from the exact law:
    P(Z > y) = sum_k P(B = k) P(A > y + k), the NB pmf by its ratio recurrence p(j + 1) = p(j) q (j + r) / (j + 1) in
    logs, the tails summed from the far end (relative precision), the support cut where the mass left is below
    e^-60 of the rate (counted as if it all lay beyond y: never understated; beyond the mode the ratio is at most
    rho = q max(1, (size + r) / (size + 1)), so that mass is at most p(size) / (1 - rho))."""
    q = math.exp(-a)
    size = int((math.log(1 / rate) + 60 + r * (1 + abs(math.log(a)))) / a) + 64
    log_p, pmf = r * math.log1p(-q), []
    for j in range(size):
        pmf.append(math.exp(log_p))
        log_p += math.log(q) + math.log(j + r) - math.log(j + 1)
    cut = math.exp(log_p) / (1 - q * max(1.0, (size + r) / (size + 1)))  # the mass beyond the support
    at_least = [0.0] * (size + 1)  # at_least[m] = P(A >= m) within the support
    for j in range(size - 1, -1, -1):
        at_least[j] = at_least[j + 1] + pmf[j]

    def upper_tail(y: int) -> float:  # P(Z > y), the cut mass added whole (for either variable)
        return math.fsum(pmf[k] * at_least[y + 1 + k] for k in range(size - y - 1)) + 2 * cut

    lo, hi = 0, size - 1
    if 2 * upper_tail(hi) > rate:
        raise ValueError(f"the support ({size}) is too short for rate={rate}, r={r}, a={a}")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if 2 * upper_tail(mid) <= rate else (mid + 1, hi)
    return lo


@lru_cache(maxsize=256)
def _plausible_limits(spec: NoiseSpec, survivors: int, scale: int, edges: tuple[float, ...],
                      rate: float) -> tuple[float, float, float, float]:
    """(mean coordinate, each bin, the bins' sum, mean against histogram): how far each may stray, in its own units,
    with the rate split evenly over the 1 + m + 2 two-sided checks."""
    m = len(edges) - 1
    each = rate / (m + 3)
    centres = _centred(edges)
    return (noise_tail(spec, survivors, [1.0], each),
            noise_tail(spec, survivors, [0.0, 1.0], each),
            noise_tail(spec, survivors, [0.0] + [1.0] * m, each),
            noise_tail(spec, survivors, [1.0 / scale] + [-c for c in centres], each))


def _centred(edges: Sequence[float]) -> list[float]:
    """The bins' centres less the middle of the range: weighting the counts by these, the known total n carries the
    rest, so the histogram's noise weighs half as much in the mean against histogram check."""
    middle = (edges[0] + edges[-1]) / 2
    return [(a + b) / 2 - middle for a, b in zip(edges, edges[1:])]


def implausibility(total: Sequence[int], *, spec: NoiseSpec, survivors: int, scale: int, edges: Sequence[float],
                   rate: float = FALSE_REFUSAL) -> str | None:
    """Why an unmasked sum ``[mean coordinate, bin counts...]`` cannot come from ``survivors`` honest members (None:
    it can). An honest sum is the members' part plus the noise of ``survivors`` shares, and its members' part is
    bounded: the mean coordinate in 0..100 * scale * n, each count in 0..n, the counts adding up to n, and the mean
    within n (widest bin / 2 + 1 / scale) points of the bins' centres (each value lies within half its bin of the
    centre; stochastic rounding moves it by less than one unit), the centres summed as n * middle + the counts
    weighted by (centre - middle), which uses the known total n where the noisy counts' sum would add noise.
    Each check refuses only noise beyond its
    ``noise_tail`` at rate / (m + 3), so an honest round is refused with probability at most ``rate`` (the union
    bound). A member may add anything within the modulus: what stays inside these ranges is not caught."""
    m = len(edges) - 1
    if len(total) != m + 1 or spec.n_hist != m:
        raise ValueError(f"need 1 + spec.n_hist={spec.n_hist} coordinates and one more edge, got {len(total)} "
                         f"coordinates and {len(edges)} edges")
    _check_survivors(spec, survivors)
    y_mean, y_bin, y_sum, y_both = _plausible_limits(spec, survivors, scale, tuple(float(e) for e in edges), rate)
    n, mean, hist = survivors, float(total[0]), [float(v) for v in total[1:]]
    top = (edges[-1] - edges[0]) * scale * n
    if not -y_mean <= mean <= top + y_mean:
        return f"the mean coordinate {mean:.0f} lies outside 0..{top:.0f} by more than the noise ({y_mean:.0f})"
    if any(not -y_bin <= h <= n + y_bin for h in hist):
        return f"a histogram count lies outside 0..{n} by more than the noise ({y_bin:.0f})"
    if abs(math.fsum(hist) - n) > y_sum:
        return f"the histogram counts add up to {math.fsum(hist):.0f}, not {n} survivors within the noise ({y_sum:.0f})"
    middle = (edges[0] + edges[-1]) / 2
    from_hist = n * middle + math.fsum(c * h for c, h in zip(_centred(edges), hist))  # sum of centres, total n
    slack = n * (max(b - a for a, b in zip(edges, edges[1:])) / 2 + 1 / scale)
    if abs(mean / scale - from_hist) > slack + y_both:
        return (f"the mean coordinate ({mean / scale / n:.1f} points) disagrees with the histogram "
                f"({from_hist / n:.1f}) by more than half a bin and the noise")
    return None


def _check_survivors(spec: NoiseSpec, survivors: int) -> None:
    if survivors < spec.shares_for:
        raise ValueError(f"survivors must be >= shares_for={spec.shares_for}, got survivors={survivors}")
