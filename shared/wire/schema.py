"""Wire formats: the member report and the aggregator's dashboard.

Compatibility contract (as in google/differential-privacy's dp_event.py): fields are never removed or
renamed, new fields are optional, meanings never change; ``schema_version`` changes only with a breaking
change. Readers ignore fields they do not know. The committed JSON Schemas in ``shared/wire/schemas/`` are
generated from these models (``python -m shared.wire.catalog``) and a test fails when they differ.

Times are tz-aware UTC, ISO 8601. A report names its release mechanism in ``release.mechanism``; a new
mechanism (Gaussian, secure aggregation, histograms) is a new release model beside ``LaplaceRelease``
(``shared.privacy``, with the privacy units and ``CPU_BOUNDS``: the math returns it, this module carries it).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.privacy import CPU_BOUNDS, LEGACY_UNIT, SECOND_UNIT, Interval, LaplaceRelease, SecureUnit

SCHEMA_VERSION = 1
REPORT_KIND = "cpu_tracker.member_report"
DASHBOARD_KIND = "cpu_tracker.dashboard"
CURRENT_KIND = "cpu_tracker.current"
SEGMENT_KIND = "cpu_tracker.history_segment"
INDEX_KIND = "cpu_tracker.history_index"

class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def to_utc(dt: datetime) -> datetime:
    """Aware ``dt`` in UTC (naive input is taken as UTC)."""
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


# ---------------------------------------------------------------------------------------------------
# Member report
# ---------------------------------------------------------------------------------------------------
class Window(_Wire):
    """The span of CPU activity a release summarises, as ``n_samples`` units of ``sample_period_s`` seconds (for
    the member app: the whole seconds of the window, each 1 s, whatever its sampling)."""

    start: AwareDatetime = Field(description="When the first sample's span began (UTC).")
    end: AwareDatetime = Field(description="When the last sample was taken (UTC).")
    n_samples: int = Field(
        ge=1, le=10**9, description="Number of sample periods averaged (public: fixed by the schedule)."
    )
    sample_period_s: float = Field(gt=0, description="Seconds each sample covers.")

    @model_validator(mode="after")
    def _ordered(self) -> "Window":
        if self.end <= self.start:
            raise ValueError(f"window end must be after start, got start={self.start} end={self.end}")
        return self

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


class PrivacyUnit(_Wire):
    """What one release's epsilon protects. ``cpu_second`` (since app 0.2): any one second of the machine's CPU
    activity, a unit no setting moves. ``cpu_sample`` (older members): one sample of ``seconds``, still accepted."""

    name: Literal[SECOND_UNIT, LEGACY_UNIT] = Field(  # type: ignore[valid-type]
        default=SECOND_UNIT, description="cpu_second: one second of CPU activity; cpu_sample: one sample (legacy)."
    )
    seconds: float = Field(gt=0, description="Length of activity the unit covers (1.0 for cpu_second).")
    description: str = Field(
        default="the CPU utilisation during any one second; longer activity: see group privacy in the README"
    )


Release = LaplaceRelease  # becomes a discriminated union on `mechanism` when a second mechanism lands


class MemberReport(_Wire):
    """One member's differentially private CPU mean for one window. Written to
    ``datasites/<member>/app_data/cpu_tracker/cpu_tracker.json``, readable by the aggregator only."""

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Changes only with a breaking change.")
    kind: Literal["cpu_tracker.member_report"] = REPORT_KIND
    app_version: str = Field(description="Version of the app that wrote it.")
    created_at: AwareDatetime = Field(description="When the report was written (UTC).")
    metric: Literal["cpu_percent_mean"] = Field(
        default="cpu_percent_mean", description="Mean of psutil.cpu_percent() samples, clipped to bounds."
    )
    bounds: tuple[float, float] = Field(default=CPU_BOUNDS, description="Clipping bounds of each sample.")
    window: Window
    release: Release
    privacy_unit: PrivacyUnit
    mode: Literal["local"] = Field(default="local", description="local: the member's own noisy release (a member in "
                                   "secure mode writes round files instead, shared.wire.secure_schema.SecureUpload).")
    cpu: float | None = Field(default=None, description="Legacy (tutorial) key: equals release.value.")
    timestamp: str | None = Field(default=None, description="Legacy (tutorial) key: created_at, 'YYYY-MM-DD HH:MM:SS' UTC.")

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] < v[1]):
            raise ValueError(f"bounds must be finite and increasing, got {v}")
        return v


class LegacyReport(_Wire):
    """The tutorial's report, ``{"cpu": 34.3, "timestamp": "2024-12-14 06:38:53"}``: accepted and counted,
    but never used in the estimate (its noise is undeclared and truncated, hence biased)."""

    cpu: float
    timestamp: datetime

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return to_utc(v)  # naive: taken as UTC; out-of-range offsets fail here, as a schema error

    @property
    def created_at(self) -> datetime:
        return self.timestamp


# ---------------------------------------------------------------------------------------------------
# Dashboard
# ---------------------------------------------------------------------------------------------------
class Estimate(_Wire):
    mean: float = Field(description="Network mean CPU (percent): unweighted mean of the fresh members' releases.")
    standard_error: float = Field(ge=0, description="Standard deviation of the DP noise in `mean`.")
    ci95_low: float = Field(description="Lower end of the 95 % interval (exact for the summed noise).")
    ci95_high: float = Field(description="Upper end of the 95 % interval.")
    members: int = Field(ge=1, description="Fresh members counted.")
    method: str = Field(description="How the figure and interval were computed.")


class Counts(_Wire):
    fresh: int = Field(ge=0, description="Valid reports recent enough to count.")
    stale: int = Field(ge=0, description="Valid reports too old to count.")
    rejected: int = Field(ge=0, description="Report files refused by validation.")
    legacy: int = Field(ge=0, description="Tutorial-format reports: accepted, not counted in the estimate.")
    rejected_by_reason: dict[str, int] = Field(default_factory=dict, description="Rejections per reason.")


class PrivacySummary(_Wire):
    mechanisms: dict[str, int] = Field(default_factory=dict, description="Fresh members per release mechanism.")
    epsilon_min: float | None = Field(default=None, description="Smallest epsilon per release among fresh members.")
    epsilon_max: float | None = Field(default=None, description="Largest epsilon per release among fresh members.")
    noise_scale_min: float | None = None
    noise_scale_max: float | None = None
    privacy_unit_s: float | None = Field(default=None, description="Longest sample period (the unit) in use.")
    window_s_max: float | None = Field(default=None, description="Longest release window in use (seconds).")


class AggregatorSettings(_Wire):
    tick_s: float
    stale_after_s: float
    min_members: int


class Series(_Wire):
    """Column-wise history: point i is (t[i], mean[i], ci95_low[i], ci95_high[i], members[i]).
    ``mean`` is null where no figure could be published (a gap); a missing stretch of ``t`` means the
    aggregator was not running."""

    resolution_s: float
    t: list[int] = Field(default_factory=list, description="Unix seconds (UTC).")
    mean: list[float | None] = Field(default_factory=list)
    ci95_low: list[float | None] = Field(default_factory=list)
    ci95_high: list[float | None] = Field(default_factory=list)
    members: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _same_length(self) -> "Series":
        n = len(self.t)
        if any(len(c) != n for c in (self.mean, self.ci95_low, self.ci95_high, self.members)):
            raise ValueError("history columns must have equal lengths")
        return self


class History(_Wire):
    recent: Series = Field(description="Every tick that changed the figure or the counts, and at least one every "
                           "stale_after_s while the aggregator runs (a heartbeat), last 24 h.")
    coarse: Series = Field(description="Averages of `recent` per 5 minutes, last 30 days.")


# ---------------------------------------------------------------------------------------------------
# Secure aggregation's figure (issue 10): the rounds' noisy sums, never a member's value
# ---------------------------------------------------------------------------------------------------
class SecureRoundStatus(_Wire):
    round: int
    round_end: AwareDatetime
    status: Literal["published", "refused", "failed"]
    survivors: int
    reason: str | None = None


class SecureFigure(_Wire):
    """The latest figure of the secure rounds, on ``dashboard.json`` and ``current.json`` as ``secure``. Computed
    from the unmasked noisy sum only: the aggregator never sees a member's value."""

    mode: Literal["secure"] = "secure"
    epoch: int
    round: int
    round_start: AwareDatetime
    round_end: AwareDatetime
    cohort: int = Field(description="Members in the epoch.")
    survivors: int = Field(description="Members whose upload the round's sum holds.")
    mean: float = Field(description="Network mean CPU (percent) over the survivors' windows.")
    standard_error: float
    ci95_low: float
    ci95_high: float
    percentiles: dict[str, Interval] = Field(default_factory=dict, description="p50, p90, p99 of the members' window "
                                             "means, each with a 95 % interval.")
    share_above: Interval | None = Field(default=None, description="Share of members (0-1) above `threshold`.")
    threshold: float = 90.0
    unit: SecureUnit
    unit_words: str = Field(description="What `epsilon` protects, in words.")
    epsilon: float = Field(description="Epsilon achieved for `unit` by this release (dp-accounting).")
    delta: float
    noise: str = Field(description="The distributed noise, e.g. 'distributed discrete Laplace'.")
    method: str
    recent: list[SecureRoundStatus] = Field(default_factory=list, description="The latest rounds, newest last.")
    cohort_too_small_for: list[str] = Field(default_factory=list, description="Those of p50, p90, p99 and "
                                            "share_above whose 95 % interval spans at least 90 % of its range: the "
                                            "cohort is too small for them, and their estimate says nothing (a reader "
                                            "shows that instead of a number).")
    min_survivors: int | None = Field(default=None, description="Fewest survivors a round needs; fewer: refused.")
    false_refusal: float | None = Field(default=None, description="The plausibility check refuses an honest round "
                                        "with at most this probability (a bound from the noise's exact law).")

    @field_validator("mean", "standard_error", "ci95_low", "ci95_high")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class _Figure(_Wire):
    """What every published figure says: the network estimate now and its context."""

    schema_version: int
    kind: str
    app_version: str
    generated_at: AwareDatetime
    status: Literal["ok", "too_few_members"] = Field(description="ok: `estimate` is set.")
    message: str = Field(description="One sentence for people: the figure, or why there is none.")
    estimate: Estimate | None = None
    counts: Counts
    privacy: PrivacySummary
    settings: AggregatorSettings
    mode: Literal["local"] = Field(default="local", description="`estimate` comes from local-mode reports.")
    secure: SecureFigure | None = Field(default=None, description="The latest secure round's figure, from the "
                                        "cohort's noisy sum (absent when no secure round has been published).")
    lead: Literal["local", "secure"] | None = Field(
        default=None, description="Which figure is the network's, the one the history's points and the headline "
        "follow: `estimate` (local-mode reports), or `secure` while its round is recent; null: neither (an older "
        "aggregator: `estimate` when it is set).")


class Dashboard(_Figure):
    """The network figure, published world-readable at
    ``datasites/<aggregator>/public/cpu_tracker/dashboard.json``. Holds no member email and no
    per-member value."""

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Changes only with a breaking change.")
    kind: Literal["cpu_tracker.dashboard"] = DASHBOARD_KIND
    history: History
    alerts: list[AlertState] | None = Field(default=None, description="Private alerts (safe zones), if any run.")


# ---------------------------------------------------------------------------------------------------
# The published history in segments, and the small file that changes every tick
# ---------------------------------------------------------------------------------------------------
Point = tuple[int, float | None, float | None, float | None, int]  # one row of a Series: (t, mean, low, high, members)


class Segment(_Wire):
    """One stretch of history, published at ``public/cpu_tracker/history/<name>``: the ticks of one UTC hour
    (series ``recent``) or the 5-minute points of one UTC day (``coarse``). It grows at its end, one closed
    5-minute block at a time, while its period is open, and is never rewritten once the period has ended.
    Points are rows (not columns, as in ``Series``), so that growing the file changes only its end."""

    schema_version: Literal[1] = Field(default=1, description="Changes only with a breaking change.")
    kind: Literal["cpu_tracker.history_segment"] = SEGMENT_KIND
    series: Literal["recent", "coarse"] = Field(description="Which series of `History` the points belong to.")
    start: int = Field(description="Unix seconds (UTC): the period's start, inclusive.")
    end: int = Field(description="Unix seconds (UTC): the period's end, exclusive.")
    resolution_s: float = Field(description="As `Series.resolution_s`.")
    complete: bool = Field(default=False, description="True in the segment's last write, after its period ended: "
                           "the file never changes again, so a reader may keep it.")
    points: list[Point] = Field(default_factory=list, description="Rows (t, mean, ci95_low, ci95_high, members), "
                                "t increasing; meanings as in `Series`.")


class OpenPoints(_Wire):
    """The points no segment holds yet (those of the open 5-minute block), as rows like `Segment.points`."""

    recent: list[Point] = Field(default_factory=list)
    coarse: list[Point] = Field(default_factory=list, description="The open 5-minute average, if any.")


class HistoryIndex(_Wire):
    """``history/index.json``: the segment files there are, oldest first. Changes only when one is added or
    removed (about once an hour)."""

    schema_version: Literal[1] = Field(default=1, description="Changes only with a breaking change.")
    kind: Literal["cpu_tracker.history_index"] = INDEX_KIND
    recent: list[str] = Field(default_factory=list, description="Hour segments of `recent` (every tick), 24 h.")
    coarse: list[str] = Field(default_factory=list, description="Day segments of `coarse` (5 minutes), 30 days.")


class Current(_Figure):
    """The network figure now, published world-readable at ``public/cpu_tracker/current.json`` and rewritten only
    when something changed: the same figure and context as ``Dashboard`` without the long history, plus the
    points of the open 5-minute block that no segment holds yet. Holds no member email and no per-member value.

    The full series: for each name in ``history/index.json``, the segment's points in that order, then
    ``open`` (points later than every segment's)."""

    schema_version: Literal[1] = Field(default=1, description="Changes only with a breaking change.")
    kind: Literal["cpu_tracker.current"] = CURRENT_KIND
    generated_at: AwareDatetime = Field(description="The last tick that changed anything (UTC).")
    open: OpenPoints = Field(description="Points of the open 5-minute block: ticks, and the open 5-minute average.")
    history_index: str = Field(default="history/index.json", description="Where the segment list is, relative.")
    alerts: list[AlertState] | None = Field(default=None, description="Private alerts (safe zones), if any run.")


# ---------------------------------------------------------------------------------------------------
# Private alerts (safe zones): shared/privacy/safezone.py, cpu_tracker_member/monitor.py,
# cpu_tracker_aggregator/alerts.py
# ---------------------------------------------------------------------------------------------------
MONITORS_KIND = "cpu_tracker.monitors"
ZONES_KIND = "cpu_tracker.safe_zones"
SIGNALS_KIND = "cpu_tracker.monitor_signals"


class AlertState(_Wire):
    """One monitor's state as the public figure shows it (``Dashboard.alerts``, ``Current.alerts``)."""

    monitor: str = Field(description="The monitor's name (its label in the metrics).")
    kind: str = Field(description="mean: mean CPU; imbalance: standard deviation of the members' CPU.")
    threshold: float = Field(description="T, percent (mean) or points of standard deviation (imbalance).")
    margin: float = Field(description="Error margin m in the same unit: the state may lag within T - m .. T + m.")
    window: int = Field(description="Window means in each member's sliding window (K).")
    state: Literal["starting", "ok", "firing", "exhausted"] = Field(
        description="starting: collecting the first vectors; exhausted: b violation rounds used (or its lifetime "
        "ended): it has stopped and says nothing more.")
    firing: bool | None = Field(default=None, description="The last state decided (also when exhausted).")
    since: AwareDatetime | None = Field(default=None, description="When `firing` last changed (UTC).")
    violation_rounds_used: int = Field(ge=0, description="Violation rounds spent.")
    violation_rounds: int = Field(ge=1, description="b: the most the monitor may spend.")
    epsilon: float = Field(gt=0, description="Lifetime epsilon per member, for one window mean of its sliding window.")
    epsilon_spent: float = Field(ge=0, description="Epsilon a member taking part in every round has spent so far.")
    members: int = Field(ge=0, description="Members holding a safe zone now.")
    estimate: float | None = Field(default=None, description="f of the last noisy global vector, in the threshold's "
                                   "unit (a DP release: post-processing of the members' noisy vectors).")
    message: str = Field(default="", description="One sentence for people.")


class MonitorDefinition(_Wire):
    """A monitor the aggregator runs, with the round it is in."""

    monitor: str
    kind: Literal["mean", "imbalance"]
    threshold: float
    margin: float
    window: int = Field(ge=1)
    epsilon: float = Field(gt=0)
    violations: int = Field(ge=1)
    generation: str = Field(description="Changes when the monitor is redefined: a new lifetime and a new budget.")
    started_at: AwareDatetime
    ends_at: AwareDatetime = Field(description="Its lifetime ends here: members stop checking, spends end here.")
    epoch: int = Field(ge=0, description="Synchronisations so far: 0 the first, +1 per violation round.")
    phase: Literal["collecting", "monitoring", "exhausted"] = Field(
        description="collecting: members send a noisy vector for `epoch`; monitoring: they check their safe zone.")


class MonitorsFile(_Wire):
    """``public/cpu_tracker/monitors.json``: the monitors and their rounds (public: definitions only)."""

    schema_version: Literal[1] = 1
    kind: Literal["cpu_tracker.monitors"] = MONITORS_KIND
    generated_at: AwareDatetime
    monitors: list[MonitorDefinition] = Field(default_factory=list)


class SafeZone(_Wire):
    monitor: str
    generation: str
    epoch: int = Field(ge=0)
    state: Literal["ok", "firing"]
    offset: list[float] = Field(min_length=1, max_length=2, description="o_i: the zone's centre in drift space, "
                                "relative to the member's own vector at the epoch's synchronisation.")
    radius: float = Field(gt=0, description="r, before the member's own perturbation.")


class SafeZonesFile(_Wire):
    """``datasites/<aggregator>/app_data/cpu_tracker_alerts/<member>/zones.json``: readable by that member only."""

    schema_version: Literal[1] = 1
    kind: Literal["cpu_tracker.safe_zones"] = ZONES_KIND
    member: str
    generated_at: AwareDatetime
    zones: list[SafeZone] = Field(default_factory=list)


class MonitorSignal(_Wire):
    monitor: str
    generation: str
    vector_epoch: int | None = Field(default=None, ge=0, description="The epoch `vector` was sent for.")
    vector: list[float] | None = Field(default=None, min_length=1, max_length=2,
                                       description="The local vector with Laplace noise (Algorithm 1).")
    breach_epoch: int | None = Field(default=None, ge=0, description="The epoch whose safe zone it left.")


class MonitorSignalsFile(_Wire):
    """``datasites/<member>/app_data/cpu_tracker/monitor.json``: breach flags and noisy vectors, readable by the
    aggregator only (the report folder's permission)."""

    schema_version: Literal[1] = 1
    kind: Literal["cpu_tracker.monitor_signals"] = SIGNALS_KIND
    created_at: AwareDatetime
    signals: list[MonitorSignal] = Field(default_factory=list)


Dashboard.model_rebuild()
Current.model_rebuild()
