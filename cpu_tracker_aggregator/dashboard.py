"""From the tick's outcomes to the public dashboard: the estimate, the counts, the history. Pure.

Nothing here names a member: the dashboard carries counts and network figures only.
"""

from __future__ import annotations

import math
from datetime import datetime

from cpu_tracker_aggregator.roster import FreshReleases, Snapshot
from shared import __version__
from shared.privacy import estimate_mean
from shared.wire.schema import (
    AggregatorSettings,
    Counts,
    Dashboard,
    Estimate,
    History,
    PrivacySummary,
    SecureFigure,
    Series,
)
from shared.settings import Settings

METHOD = ("unweighted mean of the fresh members' Laplace releases (unbiased); 95 % interval exact for the summed "
          "noise (Gil-Pelaez)")
RECENT_S = 24 * 3600
COARSE_S = 30 * 24 * 3600
COARSE_STEP_S = 300
LEVEL = 0.95


def estimate(fresh: FreshReleases, min_members: int) -> Estimate | None:
    """The network mean with its exact 95 % interval (``shared.privacy.estimate_mean``), or None with fewer than
    ``min_members`` fresh members."""
    if len(fresh) < max(1, min_members):
        return None
    e = estimate_mean(fresh.values, fresh.noise_scales, LEVEL)
    return Estimate(mean=e.mean, standard_error=e.standard_error, ci95_low=e.ci_low, ci95_high=e.ci_high,
                    members=e.members, method=METHOD)


def counts(snapshot: Snapshot) -> Counts:
    return Counts(**snapshot.counts, rejected_by_reason=snapshot.rejected_by_reason)


def privacy_of(fresh: FreshReleases) -> PrivacySummary:
    if not len(fresh):
        return PrivacySummary()
    return PrivacySummary(
        mechanisms=dict(fresh.mechanisms),
        epsilon_min=float(fresh.epsilons.min()),
        epsilon_max=float(fresh.epsilons.max()),
        noise_scale_min=float(fresh.noise_scales.min()),
        noise_scale_max=float(fresh.noise_scales.max()),
        privacy_unit_s=float(fresh.privacy_unit_s.max()),
        window_s_max=float(fresh.window_s.max()),
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def add_point(history: History, t: datetime, estimate: Estimate | None, members: int, settings: Settings) -> History:
    """``history`` with the point for ``t`` added, the current 5-minute average refreshed, and points older
    than 24 h (recent) or 30 days (coarse) dropped. A tick without a figure adds a null point (a gap)."""
    ts = int(t.timestamp())
    history = _before(history, ts)  # our clock stepped back: later points are dropped, times stay increasing
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


def _before(history: History, ts: int) -> History:
    """``history`` without the points at or after ``ts`` (the open 5-minute bucket is recomputed anyway)."""
    def cut(s: Series, limit: int) -> Series:
        keep = next((i for i, t in enumerate(s.t) if t >= limit), len(s.t))
        return s if keep == len(s.t) else s.model_copy(update={k: getattr(s, k)[:keep] for k in COLUMNS})

    return History(recent=cut(history.recent, ts), coarse=cut(history.coarse, ts - ts % COARSE_STEP_S + 1))


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


SECURE_RECENT_ROUNDS = 5  # a secure figure leads while its round ended within this many rounds (+ stale_after_s)


def secure_is_recent(figure: SecureFigure, now: datetime, settings: Settings) -> bool:
    """True while ``figure`` may stand for the network now: its round ended at most SECURE_RECENT_ROUNDS round
    lengths plus ``stale_after_s`` ago (a round is published about one round after it ends; refused or failed
    rounds leave the last figure standing until then)."""
    length = (figure.round_end - figure.round_start).total_seconds()
    return (now - figure.round_end).total_seconds() <= SECURE_RECENT_ROUNDS * length + settings.stale_after_s


def secure_estimate(figure: SecureFigure) -> Estimate:
    """The secure figure as a history point's figure: its mean and 95 % interval over its survivors."""
    return Estimate(mean=figure.mean, standard_error=figure.standard_error, ci95_low=figure.ci95_low,
                    ci95_high=figure.ci95_high, members=figure.survivors, method=figure.method)


def _secure_message(figure: SecureFigure, recent: bool) -> str:
    if recent:
        return (f"Network CPU {figure.mean:.1f} % (95 % interval {figure.ci95_low:.1f} to {figure.ci95_high:.1f}) "
                f"from {figure.survivors} of {figure.cohort} members in secure round {figure.round}: only their "
                "noisy sum was seen.")
    last = next((r for r in reversed(figure.recent) if r.status != "published"), None)
    why = f"; round {last.round} was {last.status}: {last.reason}" if last and last.reason else ""
    return (f"No current figure: the latest secure round ({figure.round}) ended at "
            f"{figure.round_end.strftime('%H:%M:%S')} UTC{why}.")


def build_dashboard(snapshot: Snapshot, history: History, now: datetime, settings: Settings,
                    secure: SecureFigure | None = None) -> Dashboard:
    """The dashboard for ``now``. The network's figure (``lead``) is ``secure`` while that round is recent, else the
    local estimate: the history's point and the message follow it."""
    est = estimate(snapshot.fresh, settings.min_members)
    c = counts(snapshot)
    recent = secure is not None and secure_is_recent(secure, now, settings)
    lead = "secure" if recent else "local" if est else None
    if lead == "secure" or (est is None and secure is not None):
        message = _secure_message(secure, recent)
    elif est is not None:
        message = (
            f"Network CPU {est.mean:.1f} % (95 % interval {est.ci95_low:.1f} to {est.ci95_high:.1f}) "
            f"from {est.members} members."
        )
    else:
        message = (
            f"No figure: {c.fresh} fresh member report(s), at least {settings.min_members} are needed."
        )
    point = secure_estimate(secure) if lead == "secure" else est
    return Dashboard(
        app_version=__version__,
        generated_at=now,
        status="ok" if est else "too_few_members",
        message=message,
        estimate=est,
        counts=c,
        privacy=privacy_of(snapshot.fresh) if est else PrivacySummary(),  # below min_members: not one member's
        settings=AggregatorSettings(
            tick_s=settings.tick_s, stale_after_s=settings.stale_after_s, min_members=settings.min_members
        ),
        history=add_point(history, now, point, point.members if point else c.fresh, settings),
        secure=secure,
        lead=lead,
    )
