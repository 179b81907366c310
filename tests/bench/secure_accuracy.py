"""Accuracy of secure aggregation with distributed noise (``shared/secnoise.py``) against local noise and the
tutorial's recipe, at the same epsilon and the same privacy unit.

In-process simulation of one round per trial: k members each quantize their window mean (``quantize``, SCALE
integers per point) and add their real ``sample_share`` draw (sized for t = ceil(0.8 k) survivors) to
``[q(mean), one-hot histogram of 20 bins]``; the secure sum is the exact sum of those vectors (the protocol makes it
exact: its exactness is tested with the protocol). Every member survives (n = k: the sum carries k / t times the
total noise, so the RMSE of the mean is sd_total / sqrt(k t)). The aggregator's figures are ``fleet_mean`` and
``fleet_estimate``. Shares are drawn from a seeded ``random.Random`` (the same samplers as the default
``random.SystemRandom``, reproducible); the per-round cost is measured with the default cryptographic source.

- Local mode (baseline): each member publishes its own noisy mean, all of its budget on the mean (no histogram),
  and the network mean is the average of k. Whole-window unit: Laplace of scale 100 / epsilon. Day unit: Gaussian
  noise whose 288 releases make (10, 1e-6)-DP by the same RDP accountant (zCDP, rho = 100^2 / (2 sigma^2)).
- The tutorial's recipe: ``diffprivlib.tools.mean([value], epsilon, bounds=(0, 100))`` per member at the same
  unit (one value of sensitivity 100: the whole window), whose noise is truncated into the bounds (FACTS.md).

Fleets: "real" (each member a random 20 s stretch of tests/bench/data/cpu_trace_real.csv: the trace is 10 minutes
long, too short for independent 5-minute windows; the noise does not depend on the values, only the tutorial's
truncation bias and the percentiles do) and "mixed" (synthetic: 50 % idle around 3 %, 30 % moderate around 30 %,
20 % busy around 85 %). Fixed seeds throughout.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tests.bench.common import Result, Row
from tests.bench.record_trace import DEFAULT as REAL_TRACE, load

SCALE = 100  # quantized integers per point of CPU: rounding adds at most (1/(2*SCALE))^2 points^2 per member
N_HIST = 20
EDGES = [5.0 * i for i in range(N_HIST + 1)]
KS = (10, 100, 1000)
FLEETS = ("real", "mixed")
MIN_SURVIVOR_FRACTION = 0.8
WINDOW_S = 20 * 10  # 20 s of 0.1 s samples
SEED = 20261201


@dataclass(frozen=True)
class Unit:
    name: str
    label: str
    family: str
    epsilon: float  # total per unit: mean and histogram together
    delta: float
    releases: int
    mean_fraction: float
    goal_k: int
    goal_rmse: float
    local_label: str


UNITS = (
    Unit("window", "a member's whole window: epsilon 1 on the mean + 1 on the histogram per window (pure DP)",
         "dlaplace", 2.0, 0.0, 1, 0.5, 100, 1.6, "Laplace 100/1 per member"),
    Unit("day", "a member's UTC day: epsilon 10 per day, delta 1e-6, mean and histogram together, 288 5-minute "
         "windows", "dgaussian", 10.0, 1e-6, 288, 0.8, 1000, 1.5, "Gaussian, (10, 1e-6) over 288 by RDP"),
)


def shares_for(k: int, fraction: float = MIN_SURVIVOR_FRACTION) -> int:
    return max(1, math.ceil(fraction * k - 1e-9))


def spec_for(unit: Unit, k: int, fraction: float = MIN_SURVIVOR_FRACTION, family: str | None = None,
             mean_fraction: float | None = None):
    from shared.secnoise import calibrate

    return calibrate(family=family or unit.family, epsilon=unit.epsilon, delta=unit.delta,
                     mean_sensitivity=100 * SCALE, releases=unit.releases,
                     mean_fraction=unit.mean_fraction if mean_fraction is None else mean_fraction,
                     shares_for=shares_for(k, fraction), n_hist=N_HIST)


def local_sd(unit: Unit) -> float:
    """Per-member noise sd of local mode, all of the unit's budget on the mean (points)."""
    if unit.family == "dlaplace" and unit.delta == 0:
        return math.sqrt(2) * 100 / (unit.epsilon * unit.mean_fraction)  # Laplace b = 100 / epsilon_mean
    from dp_accounting import dp_event, rdp

    def spent(sigma: float) -> float:
        acc = rdp.RdpAccountant()
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.ZCDpEvent(100**2 / (2 * sigma**2)), unit.releases))
        return acc.get_epsilon(unit.delta)

    lo, hi = 1.0, 1e6
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if spent(mid) <= unit.epsilon else (mid, hi)
    return hi


def secure_rmse(spec, k: int) -> float:
    """RMSE of the network mean from the formulas (points): summed noise sd over k survivors and the rounding
    (at most 1/4 unit^2 per member), divided by k * SCALE."""
    from shared.secnoise import noise_sd

    return math.sqrt(noise_sd(spec, k)[0] ** 2 + k / 4) / (k * SCALE)


def rank_half_width(spec, k: int, confidence: float = 0.95) -> float:
    """Half-width, in % of the fleet, of the count bounds at the middle edge (p50 of a histogram of N_HIST bins):
    z * sd_bin * sqrt(m / 4) / k, the rank uncertainty the percentile intervals are built from."""
    from statistics import NormalDist

    from shared.secnoise import noise_sd

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return 100 * z * noise_sd(spec, k)[1] * math.sqrt(N_HIST / 4) / k


# ---------------------------------------------------------------------------------------------------
# Fleets
# ---------------------------------------------------------------------------------------------------
def fleet(kind: str, k: int, rng: np.random.Generator, real: np.ndarray) -> np.ndarray:
    if kind == "real":
        starts = rng.integers(0, len(real) - WINDOW_S + 1, k)
        return real[starts[:, None] + np.arange(WINDOW_S)].mean(axis=1)
    u = rng.random(k)
    x = np.where(u < 0.5, rng.gamma(2.0, 1.5, k), np.where(u < 0.8, rng.beta(3, 7, k) * 100, rng.normal(85, 7, k)))
    return np.clip(x, 0.0, 100.0)


# ---------------------------------------------------------------------------------------------------
# One cell: a unit, a fleet, a cohort size
# ---------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    unit: str
    fleet: str
    k: int
    t: int
    trials: int
    rmse: float = 0.0
    rmse_formula: float = 0.0
    bias: float = 0.0
    mean_coverage: float = 0.0
    mean_half_width: float = 0.0
    pct_coverage: dict = field(default_factory=dict)
    pct_width: dict = field(default_factory=dict)
    share_coverage: float = 0.0
    local_trials: int = 0
    local_rmse: float = 0.0
    local_rmse_formula: float = 0.0
    tut_trials: int = 0
    tut_rmse: float = 0.0
    tut_bias: float = 0.0


def simulate(unit: Unit, kind: str, k: int, trials: int, tut_trials: int, real: np.ndarray,
             fraction: float = MIN_SURVIVOR_FRACTION) -> Cell:
    from shared.secnoise import fleet_estimate, fleet_mean, quantize, sample_share

    spec = spec_for(unit, k, fraction)
    seed = [SEED, UNITS.index(unit), FLEETS.index(kind), k, int(100 * fraction)]
    rng, srng = np.random.default_rng(seed), random.Random(str(seed))
    cell = Cell(unit.name, kind, k, spec.shares_for, trials, rmse_formula=secure_rmse(spec, k))
    err, cov, halves = [], [], []
    pct_hits = {"p50": 0, "p90": 0, "p99": 0}
    pct_width = {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    share_hits = 0
    loc_err, tut_err = [], []
    b_local = local_sd(unit)
    for trial in range(max(trials, tut_trials)):
        x = fleet(kind, k, rng, real)
        truth = float(x.mean())
        loc_err.append(float(np.mean(x + _local_noise(unit, b_local, k, rng))) - truth)
        if trial < tut_trials:
            tut_err.append(_tutorial(x, unit, rng) - truth)
        if trial >= trials:
            continue
        total = [0] * (N_HIST + 1)
        for v in x:
            share = sample_share(spec, N_HIST, srng)
            for i, s in enumerate(share):
                total[i] += s
            total[0] += quantize(float(v), SCALE, srng)
            total[1 + min(int(v // 5), N_HIST - 1)] += 1
        mean = fleet_mean(total[0], spec=spec, survivors=k, scale=SCALE)
        err.append(mean.estimate - truth)
        cov.append(mean.low <= truth <= mean.high)
        halves.append((mean.high - mean.low) / 2)
        est = fleet_estimate(total[1:], spec=spec, survivors=k, edges=EDGES)
        xs = np.sort(x)
        for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            iv = getattr(est, name)
            q = xs[math.ceil(p * k - 1e-9) - 1]
            pct_hits[name] += iv.low <= q <= iv.high
            pct_width[name] += iv.high - iv.low
        share = float(np.mean(x >= 90))
        share_hits += est.share_above.low <= share <= est.share_above.high
    e = np.array(err)
    cell.rmse, cell.bias = float(np.sqrt(np.mean(e**2))), float(e.mean())
    cell.mean_coverage, cell.mean_half_width = float(np.mean(cov)), float(np.mean(halves))
    cell.pct_coverage = {n: int(h) / trials for n, h in pct_hits.items()}
    cell.pct_width = {n: float(w) / trials for n, w in pct_width.items()}
    cell.share_coverage = int(share_hits) / trials
    cell.local_trials, cell.local_rmse = len(loc_err), float(np.sqrt(np.mean(np.square(loc_err))))
    cell.local_rmse_formula = b_local / math.sqrt(k)
    if tut_err:
        cell.tut_trials, cell.tut_rmse = len(tut_err), float(np.sqrt(np.mean(np.square(tut_err))))
        cell.tut_bias = float(np.mean(tut_err))
    return cell


def _local_noise(unit: Unit, sd: float, k: int, rng: np.random.Generator) -> np.ndarray:
    if unit.family == "dlaplace":
        return rng.laplace(0.0, sd / math.sqrt(2), k)
    return rng.normal(0.0, sd, k)


def _tutorial(x: np.ndarray, unit: Unit, rng: np.random.Generator) -> float:
    """diffprivlib.tools.mean of each member's one value at the unit's per-window epsilon on the mean."""
    import diffprivlib.tools as dp

    eps = unit.epsilon * unit.mean_fraction / unit.releases if unit.delta == 0 else unit.epsilon / unit.releases
    rs = np.random.RandomState(int(rng.integers(2**31)))
    return float(np.mean([dp.mean(np.array([v]), epsilon=eps, bounds=(0, 100), random_state=rs) for v in x]))


def trials_for(k: int, quick: bool) -> tuple[int, int]:
    """(secure trials, tutorial trials) per cell."""
    if quick:
        return {10: (300, 60), 100: (150, 20), 1000: (30, 4)}[k]
    return {10: (1500, 200), 100: (700, 40), 1000: (120, 8)}[k]


# ---------------------------------------------------------------------------------------------------
# Costs and the formula tables
# ---------------------------------------------------------------------------------------------------
def share_cost_ms(spec, draws: int = 300) -> float:
    """Mean wall time of one member's ``sample_share`` with the default (cryptographic) source, ms."""
    from shared.secnoise import sample_share

    sample_share(spec, N_HIST)
    started = time.perf_counter()
    for _ in range(draws):
        sample_share(spec, N_HIST)
    return (time.perf_counter() - started) / draws * 1e3


def accounting_cost(unit: Unit, spec) -> tuple[float, float, float]:
    """(calibrate s, epsilon_of s on a cold cache for a day's releases, epsilon spent)."""
    from shared import secnoise

    secnoise._epsilon_cached.cache_clear()
    started = time.perf_counter()
    spec_for(unit, 1000)
    cal = time.perf_counter() - started
    secnoise._epsilon_cached.cache_clear()
    events = [secnoise.release_event(spec, spec.shares_for)] * unit.releases
    started = time.perf_counter()
    spent = secnoise.epsilon_of(events, unit.delta)
    return cal, time.perf_counter() - started, spent


def family_table() -> str:
    """Formula figures behind the choice of family per unit, k = 1000, t = 800."""
    lines = ["Choice of family (formulas from noise_sd; k = 1,000 survivors, t = 800; hist sd is one bin's count):", "",
             "| unit | family | mean_fraction | RMSE of the mean | hist sd per bin | epsilon spent | calibrate |",
             "|---|---|---|---|---|---|---|"]
    from shared.secnoise import epsilon_of, release_event

    for unit in UNITS:
        options = [(f, mf) for f in ("dlaplace", "dgaussian") for mf in (0.5, 0.8, 0.9)]
        for family, mf in options:
            u = unit if not (family == "dgaussian" and unit.delta == 0) else Unit(**{**unit.__dict__, "delta": 1e-6})
            started = time.perf_counter()
            spec = spec_for(u, 1000, family=family, mean_fraction=mf)
            cal = time.perf_counter() - started
            spent = epsilon_of([release_event(spec, spec.shares_for)] * u.releases, u.delta)
            from shared.secnoise import noise_sd

            lines.append(f"| {unit.name} | {family}{' (delta 1e-6)' if u is not unit else ''} | {mf} | "
                         f"{secure_rmse(spec, 1000):.3f} | {noise_sd(spec, 1000)[1]:.1f} | {spent:.3f} | "
                         f"{cal * 1e3:.0f} ms |")
    return "\n".join(lines)


def _rank(half: float) -> str:
    return "> 50 (none)" if half > 50 else f"{half:.2g}"


def operator_table(sizes=(10, 100, 1000, 10000)) -> str:
    """The table for docs/secure-noise.md: RMSE of the network mean (points) and the p50 rank half-width, by
    unit and cohort size, local vs secure (t = 0.8 k, all survive), from the formulas."""
    units = [
        ("one second of activity (epsilon 5 per second on the mean + 5 on the histogram, 20 s windows, pure)",
         Unit("second", "", "dlaplace", 10.0, 0.0, 1, 0.5, 0, 0, ""), 5 * SCALE, math.sqrt(2) * 1.0),
        ("a member's whole window (epsilon 1 on the mean + 1 on the histogram, pure)", UNITS[0], 100 * SCALE,
         local_sd(UNITS[0])),
        ("a member's UTC day (epsilon 10, delta 1e-6, mean 80 % + histogram 20 %, 288 windows)", UNITS[1], 100 * SCALE,
         local_sd(UNITS[1])),
    ]
    from shared.secnoise import calibrate

    lines = ["| unit | mode | " + " | ".join(f"k = {k:,}" for k in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for label, unit, sens, local in units:
        specs = [calibrate(family=unit.family, epsilon=unit.epsilon, delta=unit.delta, mean_sensitivity=sens,
                           releases=unit.releases, mean_fraction=unit.mean_fraction, shares_for=shares_for(k),
                           n_hist=N_HIST) for k in sizes]
        lines.append(f"| {label} | local: RMSE of the mean | "
                     + " | ".join(f"{local / math.sqrt(k):.3g}" for k in sizes) + " |")
        lines.append(f"| | secure: RMSE of the mean | " + " | ".join(f"{secure_rmse(s, k):.3g}"
                                                                    for s, k in zip(specs, sizes)) + " |")
        lines.append(f"| | secure: p50 rank +- (% of fleet) | " + " | ".join(_rank(rank_half_width(s, k))
                                                                               for s, k in zip(specs, sizes)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------
def run(ctx) -> Result:
    warnings.filterwarnings("ignore", module="diffprivlib")
    res = Result("secure_accuracy", "Secure aggregation with distributed noise: accuracy against local noise")
    real = np.clip(np.array(load(REAL_TRACE)[0]), 0, 100)
    cells: list[Cell] = []
    for unit in UNITS:
        for kind in FLEETS:
            for k in KS:
                started = time.perf_counter()
                cell = simulate(unit, kind, k, *trials_for(k, ctx.quick), real)
                cells.append(cell)
                ctx.log(f"secure_accuracy: {unit.name} {kind} k={k}: rmse {cell.rmse:.3f} (formula "
                        f"{cell.rmse_formula:.3f}) local {cell.local_rmse:.2f} tutorial {cell.tut_rmse:.2f} mean "
                        f"coverage {cell.mean_coverage:.3f} pct {cell.pct_coverage} "
                        f"({time.perf_counter() - started:.1f} s)")
    full = [simulate(u, "mixed", 100, trials_for(100, ctx.quick)[0], 0, real, fraction=1.0) for u in UNITS]

    for unit in UNITS:
        goal = [c for c in cells if c.unit == unit.name and c.k == unit.goal_k]
        trials = sum(c.trials for c in goal)
        rmse = math.sqrt(sum(c.rmse**2 * c.trials for c in goal) / trials)
        formula = goal[0].rmse_formula
        se = formula / math.sqrt(2 * trials)  # standard error of an RMSE over `trials` near-normal errors
        local = math.sqrt(sum(c.local_rmse**2 * c.local_trials for c in goal) / sum(c.local_trials for c in goal))
        tut = math.sqrt(sum(c.tut_rmse**2 * c.tut_trials for c in goal) / sum(c.tut_trials for c in goal))
        spec = spec_for(unit, unit.goal_k)
        cal_s, eps_s, spent = accounting_cost(unit, spec)
        cost = share_cost_ms(spec)
        res.rows += [
            Row(f"{unit.name} unit: RMSE of the network mean, k = {unit.goal_k:,}, t = {spec.shares_for} (exact, "
                "noise_sd)", formula, "points", f"local mode ({unit.local_label}), simulated", local,
                f"<= {unit.goal_rmse} points", bool(formula <= unit.goal_rmse),
                f"(tutorial recipe, simulated: {tut:.1f})"),
            Row(f"{unit.name} unit: the same, simulated with real shares", rmse, "points", "the exact figure", formula,
                "within 3 SE of the exact figure", bool(abs(rmse - formula) <= 3 * se),
                f"(± {se:.3f} SE over {trials} trials)"),
            Row(f"{unit.name} unit: epsilon spent per unit (mean + histogram)", spent, "", "", None, "", None,
                f"({unit.label}; dp-accounting, {spec.family})"),
            Row(f"{unit.name} unit: sample_share per round (SystemRandom), t = {spec.shares_for}",
                cost, "ms", "", None, "<= 5 ms (a member's whole budget is 20 ms a round)", bool(cost <= 5)),
            Row(f"{unit.name} unit: calibrate + epsilon_of over {unit.releases} releases (cold)",
                (cal_s + eps_s) * 1e3, "ms", "", None, "", None,
                f"(calibrate {cal_s * 1e3:.0f} ms, epsilon_of {eps_s * 1e3:.0f} ms)"),
        ]
        unit_cells = [c for c in cells if c.unit == unit.name]
        n = sum(c.trials for c in unit_cells)
        mean_cov = sum(c.mean_coverage * c.trials for c in unit_cells) / n
        pct_cov = sum(sum(c.pct_coverage.values()) / 3 * c.trials for c in unit_cells) / n
        share_cov = sum(c.share_coverage * c.trials for c in unit_cells) / n
        res.rows += [
            Row(f"{unit.name} unit: coverage of the 95 % interval of the mean, all k and fleets", 100 * mean_cov, "%",
                "", None, "93-97 %", bool(0.93 <= mean_cov <= 0.97), f"({n} trials)"),
            Row(f"{unit.name} unit: p50/p90/p99 inside their 95 % intervals, all k and fleets", 100 * pct_cov, "%",
                "", None, "93-97 % (>= 95 % is guaranteed)", bool(0.93 <= pct_cov <= 0.97),
                "(above 97 %: the 5-point bins, not the noise, bound the intervals; per k on the mixed fleet: "
                + ", ".join(f"{c.k}: {100 * sum(c.pct_coverage.values()) / 3:.1f}" for c in unit_cells
                            if c.fleet == "mixed") + "; finer bins: see the n_hist table)"),
            Row(f"{unit.name} unit: share >= 90 % inside its 95 % interval", 100 * share_cov, "%", "", None, "93-97 %",
                bool(0.93 <= share_cov <= 0.97)),
        ]
    res.tables += [_cells_table(cells), _survivor_table(cells, full), _bins_table(real, ctx.quick), family_table(),
                   "Operator's table (formulas; also in docs/secure-noise.md):\n\n" + operator_table()]
    res.details = {"cells": [c.__dict__ for c in cells], "full_survivor_cells": [c.__dict__ for c in full],
                   "specs": {u.name: spec_for(u, u.goal_k).model_dump() for u in UNITS}}
    res.notes += [
        "Secure: the sum of k quantized window means (SCALE = 100 per point, unbiased stochastic rounding) and k real "
        "sample_share draws (seeded random.Random), estimated by fleet_mean / fleet_estimate; all k members "
        "survive, shares sized for t = ceil(0.8 k). RMSE scales as sd_total / sqrt(k t) = (sd_total / k) sqrt(k / t): "
        "t = 0.8 k costs sqrt(1.25) = 1.118 x the RMSE of t = k, and if only t members survive the figure is "
        "sd_total / t (another sqrt(1.25)).",
        "Local mode and the tutorial put the whole budget of the unit on the mean (no histogram), which favours "
        "them; the tutorial's truncated noise (diffprivlib.tools.mean on each member's one value, bounds 0-100) is "
        "biased towards 50 and does not average away.",
        "Family per unit: dlaplace is pure DP and exact for one release (dgaussian at the same epsilon, even with "
        "delta 1e-6, is 2-4 x noisier on the mean); over the day's 288 releases Gaussian noise composes far more "
        "cheaply in zCDP: dgaussian at mean_fraction 0.8 meets the goal with a histogram sd of ~35 per bin, while "
        "dlaplace (accounted by PLD) reaches 1.5 only at mean_fraction 0.8-0.9 with 3.5-8 x the histogram noise "
        "(family table). With t in the thousands each member's histogram share has sigma^2 / t below 1 and KLS21's "
        "tau term bites: calibrate charges it to the histogram's own part.",
        "Percentile intervals are unions of bins (5 points wide): where one bin holds the percentile with "
        "certainty, the interval is that bin and covers ~100 %; coverage nears 95 % only where the noise spans "
        "several bins' worth of members. The share >= 90 % is a linear statistic: ~95 % (higher where the true "
        "share is 0 and the interval is clipped at 0).",
        "Trials per cell (secure, tutorial): " + ", ".join(f"k = {k}: {trials_for(k, ctx.quick)}" for k in KS) + ".",
    ]
    return res


def _cells_table(cells: list[Cell]) -> str:
    lines = ["All cells (RMSE in points; coverage of 95 % intervals; width = mean interval width in points):", "",
             "| unit | fleet | k | t | secure RMSE | formula | local RMSE | tutorial RMSE (bias) | mean coverage | "
             "p50 / p90 / p99 coverage | p50 / p90 width | share coverage |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        pc, pw = c.pct_coverage, c.pct_width
        lines.append(
            f"| {c.unit} | {c.fleet} | {c.k:,} | {c.t} | {c.rmse:.3f} | {c.rmse_formula:.3f} | {c.local_rmse:.2f} | "
            f"{c.tut_rmse:.1f} ({c.tut_bias:+.1f}) | {100 * c.mean_coverage:.1f} % | "
            f"{100 * pc['p50']:.0f} / {100 * pc['p90']:.0f} / {100 * pc['p99']:.0f} % | {pw['p50']:.1f} / "
            f"{pw['p90']:.1f} | {100 * c.share_coverage:.1f} % |")
    return "\n".join(lines)


def _bins_table(real: np.ndarray, quick: bool) -> str:
    """Percentile coverage and width against the number of bins, whole-window unit (dlaplace), drawing the summed
    noise from its exact law NB(n/t, q) - NB(n/t, q) per bin (what the sum of n real shares is distributed as)."""
    from shared.secnoise import _neg_binomial, calibrate, fleet_estimate

    reps = 150 if quick else 600
    lines = ["Bins against resolution (whole-window unit, k survivors, t = 0.8 k; summed noise drawn from its exact "
             f"law; {reps} fleets per cell): coverage of p50 / p90 / p99 and mean interval width, points:", "",
             "| fleet | k | bins | coverage | width p50 / p90 / p99 |", "|---|---|---|---|---|"]
    for kind in FLEETS:
        for k in (100, 1000):
            for m in (20, 50, 100):
                edges = [100.0 * i / m for i in range(m + 1)]
                spec = calibrate(family="dlaplace", epsilon=2.0, delta=0, mean_sensitivity=100 * SCALE, releases=1,
                                 mean_fraction=0.5, shares_for=shares_for(k), n_hist=m)
                rng, srng = np.random.default_rng([SEED, k, m, len(kind)]), random.Random(f"{k}-{m}-{kind}")
                a, r = spec.hist_param, k / spec.shares_for
                hits, width = Counter(), Counter()
                for _ in range(reps):
                    x = fleet(kind, k, rng, real)
                    counts, _ = np.histogram(x, bins=edges)
                    noisy = [int(c) + _neg_binomial(r, a, srng) - _neg_binomial(r, a, srng) for c in counts]
                    est = fleet_estimate(noisy, spec=spec, survivors=k, edges=edges)
                    xs = np.sort(x)
                    for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                        iv = getattr(est, name)
                        hits[name] += iv.low <= xs[math.ceil(p * k - 1e-9) - 1] <= iv.high
                        width[name] += iv.high - iv.low
                lines.append(f"| {kind} | {k:,} | {m} | " + " / ".join(f"{100 * hits[n] / reps:.0f}" for n in hits)
                             + " % | " + " / ".join(f"{width[n] / reps:.1f}" for n in width) + " |")
    return "\n".join(lines)


def _survivor_table(cells: list[Cell], full: list[Cell]) -> str:
    lines = ["Minimum-survivor fraction (mixed fleet, k = 100, all survive): RMSE of the mean, simulated (formula):",
             "",
             "| unit | t = 0.8 k | t = k | ratio |", "|---|---|---|---|"]
    for f in full:
        c = next(c for c in cells if c.unit == f.unit and c.fleet == "mixed" and c.k == 100)
        lines.append(f"| {f.unit} | {c.rmse:.3f} ({c.rmse_formula:.3f}) | {f.rmse:.3f} ({f.rmse_formula:.3f}) | "
                     f"{c.rmse_formula / f.rmse_formula:.3f} (sqrt(k/t) = {math.sqrt(100 / c.t):.3f}) |")
    return "\n".join(lines)
