"""The public figures in Prometheus' exposition format (``prometheus-client``), where operators already look:
a textfile for node_exporter's textfile collector and, when a port is given, an HTTP endpoint on 127.0.0.1.

Names follow Prometheus' conventions: base units, CPU as a ratio in [0, 1] (the released mean may leave it
slightly: its noise is not clamped), ``_total`` for counters. Everything exposed is already public in
``current.json`` (post-processing a DP release costs no privacy): counts and network figures, no member.

The textfile lies in the aggregator's private folder (``<data_dir>/private/cpu_tracker/aggregator/``, 0700), not
in the synced public folder: every datasite on the relay would otherwise mirror a file that changes every tick.
Its content is public (mode 0644), so a collector running as the same user, or a copy, may read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cpu_tracker_aggregator.dashboard import secure_estimate
from shared.atomic import atomic_write_bytes, ensure_private_dir
from shared.privacy import CPU_BOUNDS
from shared.wire.schema import Dashboard

PREFIX = "cpu_tracker"
PERCENT = CPU_BOUNDS[1] - CPU_BOUNDS[0]  # the figures are percentages; Prometheus wants ratios


class FigureCollector:
    """Yields the metrics of the last dashboard the aggregator built (``update``), and its tick counters."""

    def __init__(self) -> None:
        self.dashboard: Dashboard | None = None
        self.ticks = 0
        self.changed_ticks = 0

    def update(self, dashboard: Dashboard, *, changed: bool) -> None:
        self.dashboard = dashboard
        self.ticks += 1
        self.changed_ticks += changed

    def collect(self):
        yield CounterMetricFamily(f"{PREFIX}_ticks", "Aggregator ticks since the process started.", value=self.ticks)
        yield CounterMetricFamily(f"{PREFIX}_changed_ticks", "Ticks that changed the figure or the counts (and "
                                  "were published) since the process started.", value=self.changed_ticks)
        d = self.dashboard
        if d is None:
            return
        e = secure_estimate(d.secure) if d.lead == "secure" else d.estimate
        yield GaugeMetricFamily(f"{PREFIX}_figure_published", "1 when a network figure is published (enough fresh "
                                "members, or a recent secure round), else 0.", value=1.0 if e else 0.0)
        source = GaugeMetricFamily(f"{PREFIX}_figure_source", "1 for where the network figure comes from: local "
                                   "(members' own noisy reports) or secure (a secure round's noisy sum).",
                                   labels=["source"])
        for name in ("local", "secure"):
            source.add_metric([name], 1.0 if e is not None and (d.lead or "local") == name else 0.0)
        yield source
        yield GaugeMetricFamily(f"{PREFIX}_last_change_timestamp_seconds", "When the figure or the counts last "
                                "changed (Unix time).", value=d.generated_at.timestamp())
        if e is not None:
            for name, value, text in (
                ("network_cpu_ratio", e.mean, "Network mean CPU utilisation (DP estimate; figure_source says "
                 "which)."),
                ("network_cpu_ci95_low_ratio", e.ci95_low, "Lower end of its 95 % interval."),
                ("network_cpu_ci95_high_ratio", e.ci95_high, "Upper end of its 95 % interval."),
                ("network_cpu_standard_error_ratio", e.standard_error, "Standard deviation of its DP noise."),
            ):
                yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value / PERCENT)
        members = GaugeMetricFamily(f"{PREFIX}_members", "Member reports by status.", labels=["status"])
        for status in ("fresh", "stale", "rejected", "legacy"):
            members.add_metric([status], getattr(d.counts, status))
        yield members
        rejected = GaugeMetricFamily(f"{PREFIX}_rejected_reports", "Rejected report files by reason.",
                                     labels=["reason"])
        for reason, n in sorted(d.counts.rejected_by_reason.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield GaugeMetricFamily(f"{PREFIX}_min_members", "Fewest fresh members for a figure.",
                                value=d.settings.min_members)


class FeatureCollector:
    """One aggregator feature's metrics (``Feature.metrics``) of the dashboard the figures collector holds."""

    def __init__(self, metrics_of: Callable[[Dashboard], Iterable], figures: FigureCollector) -> None:
        self.metrics_of, self.figures = metrics_of, figures

    def collect(self):
        if self.figures.dashboard is not None:
            yield from self.metrics_of(self.figures.dashboard)


def secure_metrics(sec):
    """The latest secure round's figure: mean and interval (ratios), survivors and cohort, percentiles, the share
    above the threshold, the epsilon achieved, and the latest rounds' outcomes."""
    for name, value, text in (
        ("secure_network_cpu_ratio", sec.mean, "Network mean CPU from the latest secure round (DP, noisy sum only)."),
        ("secure_network_cpu_ci95_low_ratio", sec.ci95_low, "Lower end of its 95 % interval."),
        ("secure_network_cpu_ci95_high_ratio", sec.ci95_high, "Upper end of its 95 % interval."),
    ):
        yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value / PERCENT)
    yield GaugeMetricFamily(f"{PREFIX}_secure_round", "Number of the latest published secure round (UTC window).",
                            value=sec.round)
    yield GaugeMetricFamily(f"{PREFIX}_secure_round_end_timestamp_seconds", "End of that round's window.",
                            value=sec.round_end.timestamp())
    yield GaugeMetricFamily(f"{PREFIX}_secure_survivors", "Members whose uploads that round's sum holds.",
                            value=sec.survivors)
    yield GaugeMetricFamily(f"{PREFIX}_secure_cohort", "Members in the epoch.", value=sec.cohort)
    yield GaugeMetricFamily(f"{PREFIX}_secure_epsilon", f"Epsilon achieved by that round, per {sec.unit_words}.",
                            value=sec.epsilon)
    pct = GaugeMetricFamily(f"{PREFIX}_secure_fleet_cpu_percentile_ratio", "Fleet percentiles of the members' "
                            "window means (DP), with their 95 % interval; absent while the cohort is too small for "
                            "one (its interval spans about the whole range).", labels=["quantile", "bound"])
    for q, item in sorted(sec.percentiles.items()):
        if q in sec.cohort_too_small_for:
            continue
        for bound, value in (("estimate", item.estimate), ("low", item.low), ("high", item.high)):
            pct.add_metric([q[1:], bound], value / PERCENT)
    yield pct
    if sec.share_above is not None and "share_above" not in sec.cohort_too_small_for:
        above = GaugeMetricFamily(f"{PREFIX}_secure_members_above_threshold_ratio", f"Share of members above "
                                  f"{sec.threshold:g} % CPU (DP), with its 95 % interval.", labels=["bound"])
        for bound, value in (("estimate", sec.share_above.estimate), ("low", sec.share_above.low),
                             ("high", sec.share_above.high)):
            above.add_metric([bound], value)
        yield above
    rounds = GaugeMetricFamily(f"{PREFIX}_secure_recent_rounds", "Outcome of the latest secure rounds.",
                               labels=["status"])
    for status in ("published", "refused", "failed"):
        rounds.add_metric([status], sum(1 for r in sec.recent if r.status == status))
    yield rounds


class Metrics:
    """The registry, its textfile, and the optional HTTP endpoint (127.0.0.1 only)."""

    def __init__(self, textfile: Path, port: int | None = None,
                 features: Iterable[Callable[[Dashboard], Iterable]] = ()):
        """``features``: each feature's ``metrics``, registered in this order after the figures."""
        self.textfile = Path(textfile)
        self.figures = FigureCollector()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self.figures)
        for metrics_of in features:
            self.registry.register(FeatureCollector(metrics_of, self.figures))
        self.server = None
        if port:
            self.server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def update(self, dashboard: Dashboard, *, changed: bool) -> None:
        """Record the tick; rewrite the textfile (atomically, like every file the app writes) only when the figure
        or the counts changed. Raises OSError."""
        self.figures.update(dashboard, changed=changed)
        if changed or not self.textfile.exists():
            ensure_private_dir(self.textfile.parent)  # the aggregator's private folder stays 0700
            atomic_write_bytes(self.textfile, generate_latest(self.registry), durable=False)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
