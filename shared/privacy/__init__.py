"""Privacy math, pure functions. Noise is drawn only in ``laplace_release`` (diffprivlib, imported lazily).

Unit: one second of CPU activity (``SECOND_UNIT``), fixed: no setting moves it. A window of n whole seconds averages n
one-second busy fractions clipped to [lower, upper]; changing any one second moves it by at most
(upper - lower) / n (the L1 sensitivity), so the Laplace mechanism with scale b = sensitivity / epsilon
makes each release epsilon-DP for that unit (Dwork & Roth 2014, Thm 3.6). Activity lasting k seconds
costs k * epsilon (group privacy, ibid. Thm 2.2), summed over releases (basic composition, Thm 3.14).

Also here, below everything that names them: the privacy units every file and setting uses, ``CPU_BOUNDS`` and
``clip_cpu``, the rolling budgets (``Budget``: set in the settings, enforced by ``ledger``), and the values the math
returns that the wire formats carry as they are (``LaplaceRelease``, ``Interval``). Secure mode's noise is in
``shared.secure.secnoise``; the ledger and the safe zones are this package's ``ledger`` and ``safezone``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

CPU_BOUNDS = (0.0, 100.0)  # psutil.cpu_percent() is a percentage: every sample is clipped to these bounds
# What a release's epsilon protects (its privacy unit), as every file and setting names it
SECOND_UNIT = "cpu_second"  # any one second of the machine's CPU activity: local mode's unit, fixed
WINDOW_UNIT = "cpu_window"  # secure mode: a member's whole window
DAY_UNIT = "cpu_day"  # secure mode: a member's whole UTC day
LEGACY_UNIT = "cpu_sample"  # before app 0.2: one sample of sample_period_s seconds
SecureUnit = Literal[SECOND_UNIT, WINDOW_UNIT, DAY_UNIT]  # type: ignore[valid-type]  (names of literals)
# The values this math returns are written to the wire as they are (``shared.wire`` builds its files from them):
# immutable, extra keys ignored when read back, NaN and infinities refused.
_VALUE = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class LaplaceRelease(BaseModel):
    """A value released with the Laplace mechanism (diffprivlib.mechanisms.Laplace, unbiased, delta = 0)."""

    model_config = _VALUE

    mechanism: Literal["laplace"] = "laplace"
    value: float = Field(description="The released (noisy) mean, in percent. Not clamped: may leave the bounds.")
    epsilon: float = Field(gt=0, description="Epsilon spent by this release, for the privacy unit.")
    delta: float = Field(default=0.0, ge=0, le=0, description="Pure DP: always 0.")
    sensitivity: float = Field(gt=0, description="L1 sensitivity of the mean: (upper - lower) / n_samples.")
    noise_scale: float = Field(gt=0, description="Laplace scale b = sensitivity / epsilon.")
    noise_std: float = Field(gt=0, description="Standard deviation of the noise, sqrt(2) * b.")
    implementation: str = Field(default="", description="Library and version that drew the noise.")


class Interval(BaseModel):
    model_config = _VALUE

    estimate: float = Field(description="Point estimate.")
    low: float = Field(description="Lower end of the interval.")
    high: float = Field(description="Upper end of the interval.")


def mean_sensitivity(lower: float, upper: float, n_samples: int) -> float:
    """L1 sensitivity of the mean of ``n_samples`` values clipped to [lower, upper]."""
    if not upper > lower:
        raise ValueError(f"bounds must satisfy lower < upper, got lower={lower}, upper={upper}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got n_samples={n_samples}")
    return (upper - lower) / n_samples


def clip_cpu(percent: float) -> float:
    """A CPU reading (percent) clipped to ``CPU_BOUNDS``: what every release, vector and monitor averages."""
    return min(max(float(percent), CPU_BOUNDS[0]), CPU_BOUNDS[1])


def window_sensitivity(n_samples: int) -> float:
    """L1 sensitivity of a window mean of ``n_samples`` whole seconds, each clipped to ``CPU_BOUNDS``."""
    return mean_sensitivity(*CPU_BOUNDS, n_samples)


def window_noise_scale(n_samples: int, epsilon: float) -> float:
    """The Laplace scale of a local-mode release of a window of ``n_samples`` whole seconds at ``epsilon``."""
    return laplace_scale(window_sensitivity(n_samples), epsilon)


def laplace_scale(sensitivity: float, epsilon: float) -> float:
    """Laplace scale b = sensitivity / epsilon."""
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be > 0, got sensitivity={sensitivity}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got epsilon={epsilon}")
    return sensitivity / epsilon


def laplace_release(
    raw_mean: float, *, epsilon: float, sensitivity: float, random_state=None
) -> LaplaceRelease:
    """Release ``raw_mean`` with diffprivlib's unbiased Laplace mechanism (not the truncated noise of
    ``diffprivlib.tools.mean``). ``random_state=None`` draws from the system's cryptographic RNG; pass a seed
    or a numpy RandomState only in tests."""
    import diffprivlib
    from diffprivlib.mechanisms import Laplace

    scale = laplace_scale(sensitivity, epsilon)
    mech = Laplace(epsilon=epsilon, sensitivity=sensitivity, random_state=random_state)
    value = float(mech.randomise(float(raw_mean)))
    return LaplaceRelease(
        value=value,
        epsilon=epsilon,
        sensitivity=sensitivity,
        noise_scale=scale,
        noise_std=math.sqrt(2.0) * scale,
        implementation=f"diffprivlib {diffprivlib.__version__} mechanisms.Laplace",
    )


# ---------------------------------------------------------------------------------------------------
# The privacy unit: one second of CPU activity, fixed, whatever the settings
# ---------------------------------------------------------------------------------------------------
UNIT_S = 1.0  # SECOND_UNIT's length
DAY_S = 86400.0  # DAY_UNIT's length, and a day wherever the app counts in days
MAX_HORIZON_S = 366 * DAY_S  # a year and a day: longer horizons mean nothing for a CPU tracker, and cost memory
LEGACY_PERIOD_MAX_S = 0.1  # the old default period, the longest one an old ledger line is credited with
COARSER_UNITS = (WINDOW_UNIT, DAY_UNIT)  # secure mode's units: a member's whole window, its whole UTC day


def units_per_window(interval_s: float) -> int:
    """Whole units in a window of ``interval_s`` seconds: n = floor(interval / 1 s), at least 1.

    The member reads the kernel's busy time once per window, so its value is the time average of the busy
    fraction over T >= ``interval_s`` seconds. Changing the activity of any one second (anywhere, not aligned to
    a grid) moves that average by at most 100 * 1 / T <= 100 / n points: the sensitivity is
    ``mean_sensitivity(0, 100, n)``, and a report can state n samples of 1 s each."""
    if not (math.isfinite(interval_s) and interval_s >= UNIT_S):
        raise ValueError(f"interval_s must be finite and >= {UNIT_S:g} s, got interval_s={interval_s}")
    return max(1, math.floor(interval_s / UNIT_S + 1e-9))


def samples_touched(activity_s: float, sample_period_s: float) -> int:
    """Most samples of ``sample_period_s`` seconds an activity lasting ``activity_s`` seconds can touch (0 s: one
    instant, one sample): ceil(activity / period) + 1, since it need not start on a sample's edge."""
    if activity_s < 0 or sample_period_s <= 0:
        raise ValueError(f"need activity_s >= 0 and sample_period_s > 0, got {activity_s}, {sample_period_s}")
    if activity_s == 0:
        return 1
    return math.ceil(activity_s / sample_period_s - 1e-9) + 1


def epsilon_per_unit(unit: str, epsilon: float, *, n_samples: int, window_s: float) -> float:
    """The epsilon of one release in the fixed unit (one second of activity), from what its record says.

    ``cpu_second``: as recorded. ``cpu_sample`` (ledgers and reports before the fixed unit): one second of
    activity touches up to ceil(1 / s) + 1 samples of s seconds, so it costs epsilon * (ceil(1 / s) + 1)
    (group privacy, Dwork & Roth 2014, Thm 2.2). s is taken as window_s / n_samples, and never more than the old
    default 0.1 s: a clock step that stretched an old window can only overstate the spend, never understate it."""
    if unit in (SECOND_UNIT, *COARSER_UNITS):  # a release private for a whole window or day is so for any second in it
        return epsilon
    if unit == LEGACY_UNIT:
        if n_samples < 1 or not window_s > 0:
            raise ValueError(f"need n_samples >= 1 and window_s > 0, got {n_samples}, {window_s}")
        period = min(window_s / n_samples, LEGACY_PERIOD_MAX_S)
        return epsilon * samples_touched(UNIT_S, period)
    raise ValueError(f"unknown privacy unit {unit!r}; known: {SECOND_UNIT!r}, {LEGACY_UNIT!r}")


def activity_units(activity_s: float) -> int:
    """Units an activity lasting ``activity_s`` seconds covers: ceil(activity / 1 s), at least 1 (a brief spike is
    within one second). Any d seconds are covered by ceil(d) one-second spans, placed anywhere."""
    if not (math.isfinite(activity_s) and activity_s >= 0):
        raise ValueError(f"activity_s must be finite and >= 0, got activity_s={activity_s}")
    return max(1, math.ceil(activity_s / UNIT_S - 1e-9))


def activity_epsilon(activity_s: float, *, epsilon: float) -> float:
    """Privacy loss, under continuous release at ``epsilon`` per unit, of any activity lasting ``activity_s``
    seconds: epsilon per second it covers (group privacy, then composition over the windows it spans; a second
    split between two windows costs each its share, epsilon in total, since every window's sensitivity is
    100 / n for n whole seconds)."""
    return epsilon * activity_units(activity_s)


# ---------------------------------------------------------------------------------------------------
# Rolling budgets (set in the settings, enforced by the ledger)
# ---------------------------------------------------------------------------------------------------
class Budget(BaseModel):
    """A rolling privacy budget: the epsilon summed over every release whose window touches any span of
    ``horizon_s`` seconds never exceeds ``epsilon`` (in the fixed unit: one second of CPU activity)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    horizon_s: float = Field(
        ge=0, le=MAX_HORIZON_S, description="Length of the rolling span in seconds (0: one instant; at most 366 days)."
    )
    epsilon: float = Field(gt=0, le=1e9, description="Most epsilon all releases touching such a span may spend.")


def duration_words(seconds: float) -> str:
    """``3600`` -> "1 hour", ``0`` -> "an instant", ``90`` -> "1.5 minutes": for messages and status."""
    if seconds == 0:
        return "an instant"
    for size, name in ((DAY_S, "day"), (3600.0, "hour"), (60.0, "minute"), (1.0, "second")):
        if seconds >= size:
            n = seconds / size
            return f"{n:.3g} {name}{'' if n == 1 else 's'}"
    return f"{seconds:.3g} seconds"


def budget_words(budget: Budget) -> str:
    """A budget in plain words: "at most 1000 epsilon on any span of 1 hour"."""
    where = "any single instant" if budget.horizon_s == 0 else f"any span of {duration_words(budget.horizon_s)}"
    return f"at most {budget.epsilon:g} epsilon on {where}"


# ---------------------------------------------------------------------------------------------------
# The network estimate and its exact interval
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeanEstimate:
    mean: float
    standard_error: float
    ci_low: float
    ci_high: float
    members: int


def estimate_mean(values: Sequence[float], laplace_scales: Sequence[float], level: float = 0.95) -> MeanEstimate:
    """The one network estimator: the unweighted mean of k releases value_i = x_i + Laplace(0, b_i), unbiased for
    the mean of the x_i, with standard error sqrt(sum 2 b_i^2) / k and the interval mean +- h where
    P(|noise of the mean| <= h) = ``level`` under the exact distribution of the summed noise (not a normal
    approximation). The half width is computed once per distinct set of scales (cached): members' scales rarely
    change from one tick to the next."""
    import numpy as np

    values, scales = np.asarray(values, dtype=float), np.asarray(laplace_scales, dtype=float)
    k = len(values)
    if k == 0:
        raise ValueError("need at least one value")
    if scales.shape != values.shape or not np.all(scales >= 0):
        raise ValueError(f"need one scale >= 0 per value, got {scales.shape} scales for {values.shape} values")
    mean = float(values.sum()) / k
    se = math.sqrt(2.0 * float(np.dot(scales, scales))) / k
    lo, hi = float(scales.min()), float(scales.max())
    if lo == hi:  # the usual case (every member on the default settings): no sort
        groups = ((lo / k, k),) if lo > 0 else ()
    else:
        distinct, counts = np.unique(scales[scales > 0] / k, return_counts=True)
        groups = tuple(zip(map(float, distinct), map(int, counts)))
    half = grouped_half_width(groups, 0.0, level) if groups else 0.0
    return MeanEstimate(mean=mean, standard_error=se, ci_low=mean - half, ci_high=mean + half, members=k)


@lru_cache(maxsize=256)  # members' scales rarely change from one tick to the next
def grouped_half_width(groups: tuple[tuple[float, int], ...], gauss_std: float, level: float) -> float:
    """h with P(|sum_i L_i + G| <= h) = level, for independent L_i ~ Laplace(0, b_i) given as sorted (b, count)
    pairs (hashable: cached) and G ~ N(0, gauss_std^2).

    Uses Gil-Pelaez inversion of the characteristic function prod_i 1/(1 + b_i^2 t^2) * exp(-s^2 t^2 / 2):
    P(|X| <= h) = (2/pi) * integral_0^inf sin(h t) phi(t) / t dt."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got level={level}")
    if not groups and gauss_std <= 0:
        return 0.0
    groups = Counter(dict(groups))
    sd = math.sqrt(sum(2 * b * b * m for b, m in groups.items()) + gauss_std**2)
    coverage = _abs_cdf(groups, gauss_std)
    lo, hi = 0.0, 10.0 * sd
    while coverage(hi) < level:  # heavy tails of a lone Laplace need more than 10 sd only at extreme levels
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if coverage(mid) < level else (lo, mid)
        if hi - lo <= 1e-9 * sd:
            break
    return (lo + hi) / 2


def _abs_cdf(groups: Counter, gauss_std: float):
    import numpy as np
    from scipy import integrate

    scales = np.array(list(groups.keys()))
    powers = np.array(list(groups.values()), dtype=float)

    def phi(t: float) -> float:
        return float(np.exp(-np.sum(powers * np.log1p((scales * t) ** 2)) - 0.5 * (gauss_std * t) ** 2))

    sd = math.sqrt(float(np.sum(2 * scales**2 * powers)) + gauss_std**2)
    split = 1.0 / sd  # below: smooth, few oscillations; above: a Fourier integral of a decaying function

    def coverage(h: float) -> float:
        if h <= 0:
            return 0.0
        near, _ = integrate.quad(lambda t: math.sin(h * t) / t * phi(t) if t > 0 else h, 0.0, split, limit=200)
        far, _ = integrate.quad(lambda t: phi(t) / t, split, np.inf, weight="sin", wvar=h, limlst=200)
        return min(1.0, max(0.0, 2.0 / math.pi * (near + far)))

    return coverage
