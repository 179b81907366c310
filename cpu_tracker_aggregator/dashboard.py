"""From the tick's outcomes to the public dashboard: the estimate, the counts, the history. Pure.

Nothing here names a member: the dashboard carries counts and network figures only.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime
from typing import Sequence

from cpu_tracker_aggregator.collect import MemberOutcome
from shared import __version__
from shared.privacy import NoisyValue, estimate_mean
from shared.schema import (
    AggregatorSettings,
    Counts,
    Dashboard,
    Estimate,
    History,
    MemberReport,
    PrivacySummary,
    Series,
)
from shared.settings import Settings

METHOD = (
    "unweighted mean of the fresh members' Laplace releases (unbiased for the mean of their window means); "
    "95 % interval from the exact distribution of the summed Laplace noise (Gil-Pelaez inversion)"
)
RECENT_S = 24 * 3600
COARSE_S = 30 * 24 * 3600
COARSE_STEP_S = 300


def fresh_reports(outcomes: Sequence[MemberOutcome]) -> list[MemberReport]:
    return [o.accepted.report for o in outcomes if o.status == "fresh"]  # type: ignore[union-attr,misc]


def network_estimate(reports: Sequence[MemberReport], min_members: int) -> Estimate | None:
    """The network mean with its exact 95 % interval, or None with fewer than ``min_members`` reports."""
    if len(reports) < max(1, min_members):
        return None
    est = estimate_mean([NoisyValue(r.release.value, laplace_scale=r.release.noise_scale) for r in reports])
    return Estimate(
        mean=est.mean,
        standard_error=est.standard_error,
        ci95_low=est.ci_low,
        ci95_high=est.ci_high,
        members=est.members,
        method=METHOD,
    )


def count(outcomes: Sequence[MemberOutcome]) -> Counts:
    by_status = Counter(o.status for o in outcomes)
    return Counts(
        fresh=by_status["fresh"],
        stale=by_status["stale"],
        rejected=by_status["rejected"],
        legacy=by_status["legacy"],
        rejected_by_reason=dict(sorted(Counter(o.reason for o in outcomes if o.status == "rejected").items())),
    )


def privacy_summary(reports: Sequence[MemberReport]) -> PrivacySummary:
    if not reports:
        return PrivacySummary()
    eps = [r.release.epsilon for r in reports]
    scales = [r.release.noise_scale for r in reports]
    return PrivacySummary(
        mechanisms=dict(Counter(r.release.mechanism for r in reports)),
        epsilon_min=min(eps),
        epsilon_max=max(eps),
        noise_scale_min=min(scales),
        noise_scale_max=max(scales),
        privacy_unit_s=max(r.privacy_unit.seconds for r in reports),
        window_s_max=max(r.window.seconds for r in reports),
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def add_point(history: History, t: datetime, estimate: Estimate | None, members: int, settings: Settings) -> History:
    """``history`` with the point for ``t`` added, the current 5-minute average refreshed, and points older
    than 24 h (recent) or 30 days (coarse) dropped. A tick without a figure adds a null point (a gap)."""
    ts = int(t.timestamp())
    recent = _append(
        history.recent, ts, _round(estimate.mean) if estimate else None,
        _round(estimate.ci95_low) if estimate else None, _round(estimate.ci95_high) if estimate else None, members,
    )
    recent = _trim(recent, ts - RECENT_S, settings.history_points)
    bucket = ts - ts % COARSE_STEP_S
    coarse = history.coarse
    if coarse.t and coarse.t[-1] == bucket:
        coarse = _drop_last(coarse)  # the open bucket: recomputed below
    coarse = _append(coarse, bucket, *_bucket_average(recent, bucket))
    coarse = _trim(coarse, ts - COARSE_S, None)
    return History(recent=recent, coarse=coarse)


def empty_history(settings: Settings) -> History:
    return History(recent=Series(resolution_s=settings.tick_s), coarse=Series(resolution_s=COARSE_STEP_S))


def _append(s: Series, t: int, mean, low, high, members: int) -> Series:
    return s.model_copy(update={k: [*getattr(s, k), v] for k, v in zip(COLUMNS, (t, mean, low, high, members))})


COLUMNS = ("t", "mean", "ci95_low", "ci95_high", "members")


def _trim(s: Series, since: int, keep: int | None) -> Series:
    """``s`` without points before ``since`` and, with ``keep``, without all but the last ``keep``."""
    first = next((i for i, t in enumerate(s.t) if t >= since), len(s.t))
    if keep is not None:
        first = max(first, len(s.t) - keep)
    return s if first == 0 else s.model_copy(update={k: getattr(s, k)[first:] for k in COLUMNS})


def _drop_last(s: Series) -> Series:
    return s.model_copy(update={k: getattr(s, k)[:-1] for k in COLUMNS})


def _bucket_average(recent: Series, bucket: int) -> tuple[float | None, float | None, float | None, int]:
    """Average of the figures in [bucket, bucket + 5 min): the mean, and the ends of the interval averaged
    (a conservative band: averaging correlated tick figures narrows their true interval less than it would
    narrow independent ones). Null if no tick in the bucket had a figure."""
    idx = [i for i, t in enumerate(recent.t) if bucket <= t < bucket + COARSE_STEP_S]
    figs = [i for i in idx if recent.mean[i] is not None]
    members = max((recent.members[i] for i in idx), default=0)
    if not figs:
        return None, None, None, members
    avg = lambda col: _round(math.fsum(col[i] for i in figs) / len(figs))  # noqa: E731
    return avg(recent.mean), avg(recent.ci95_low), avg(recent.ci95_high), members


def build_dashboard(
    outcomes: Sequence[MemberOutcome], history: History, now: datetime, settings: Settings
) -> Dashboard:
    reports = fresh_reports(outcomes)
    estimate = network_estimate(reports, settings.min_members)
    counts = count(outcomes)
    if estimate is not None:
        message = (
            f"Network CPU {estimate.mean:.1f} % (95 % interval {estimate.ci95_low:.1f} to {estimate.ci95_high:.1f}) "
            f"from {estimate.members} members."
        )
    else:
        message = (
            f"No figure: {counts.fresh} fresh member report(s), at least {settings.min_members} are needed "
            f"so that no single member's value can be read off the network figure."
        )
    return Dashboard(
        app_version=__version__,
        generated_at=now,
        status="ok" if estimate else "too_few_members",
        message=message,
        estimate=estimate,
        counts=counts,
        privacy=privacy_summary(reports if estimate else []),  # below min_members: not one member's settings
        settings=AggregatorSettings(
            tick_s=settings.tick_s, stale_after_s=settings.stale_after_s, min_members=settings.min_members
        ),
        history=add_point(history, now, estimate, counts.fresh, settings),
    )
