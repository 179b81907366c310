"""The Prometheus exposition: parsed back with prometheus_client's own parser, its values are current.json's."""

from __future__ import annotations

import logging
import socket
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cpu_tracker_aggregator.aggregator import Aggregator
from cpu_tracker_member.member import build_report
from shared.atomic import atomic_write_json
from shared.logs import Problems
from shared.paths import Paths
from shared.wire.schema import Current
from shared.settings import Settings

AGG = "agg@example.org"
NOW = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def workspace(tmp_path: Path, members: int) -> Paths:
    paths, settings = Paths(data_dir=tmp_path, email=AGG), Settings(aggregator=AGG)
    for i in range(members):
        _, report = build_report(10.0 + 20 * i, settings.samples_per_window, NOW - timedelta(seconds=20), NOW,
                                 settings, random_state=i)
        atomic_write_json(paths.report_file(f"m{i}@example.org"), report.model_dump(mode="json"))
    bad = paths.report_file("bad@example.org")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b'{"cpu": 3')
    return paths


def check_against_current(text: str, paths: Paths) -> None:
    cur = Current.model_validate_json(paths.current_file.read_bytes())
    got = samples(text)
    assert got[("cpu_tracker_network_cpu_ratio", ())] == pytest.approx(cur.estimate.mean / 100)
    assert got[("cpu_tracker_network_cpu_ci95_low_ratio", ())] == pytest.approx(cur.estimate.ci95_low / 100)
    assert got[("cpu_tracker_network_cpu_ci95_high_ratio", ())] == pytest.approx(cur.estimate.ci95_high / 100)
    assert got[("cpu_tracker_network_cpu_standard_error_ratio", ())] == pytest.approx(cur.estimate.standard_error / 100)
    for status in ("fresh", "stale", "rejected", "legacy"):
        assert got[("cpu_tracker_members", (("status", status),))] == getattr(cur.counts, status)
    for reason, n in cur.counts.rejected_by_reason.items():
        assert got[("cpu_tracker_rejected_reports", (("reason", reason),))] == n
    assert got[("cpu_tracker_figure_published", ())] == 1
    assert got[("cpu_tracker_last_change_timestamp_seconds", ())] == cur.generated_at.timestamp()
    assert got[("cpu_tracker_min_members", ())] == cur.settings.min_members
    assert got[("cpu_tracker_ticks_total", ())] >= 1


def test_the_textfile_holds_current_json_figures(tmp_path: Path) -> None:
    paths = workspace(tmp_path, 4)
    agg = Aggregator(paths, Settings(aggregator=AGG), Problems(logging.getLogger("t")))
    agg.tick(NOW)
    agg.tick(NOW + timedelta(seconds=10))
    text = paths.metrics_file.read_text()
    check_against_current(text, paths)
    assert ("cpu_tracker_changed_ticks_total", ()) in samples(text)
    assert not str(paths.metrics_file).startswith(str(paths.datasites))  # never synced
    assert "@" not in text  # names no member


def test_no_figure_exposes_no_network_value(tmp_path: Path) -> None:
    paths = workspace(tmp_path, 2)  # below min_members
    Aggregator(paths, Settings(aggregator=AGG), Problems(logging.getLogger("t"))).tick(NOW)
    got = samples(paths.metrics_file.read_text())
    assert got[("cpu_tracker_figure_published", ())] == 0
    assert not [k for k in got if k[0].startswith("cpu_tracker_network_cpu")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_endpoint_serves_the_same_figures_on_loopback(tmp_path: Path) -> None:
    paths = workspace(tmp_path, 4)
    port = free_port()
    agg = Aggregator(paths, Settings(aggregator=AGG), Problems(logging.getLogger("t")), metrics_port=port)
    try:
        agg.tick(NOW)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            check_against_current(response.read().decode(), paths)
        assert agg.metrics.server.server_address[0] == "127.0.0.1"
    finally:
        agg.metrics.close()


def test_a_taken_port_is_said_once_and_the_textfile_still_works(tmp_path: Path, caplog) -> None:
    paths = workspace(tmp_path, 4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agg = Aggregator(paths, Settings(aggregator=AGG), Problems(logging.getLogger("t")),
                         metrics_port=taken.getsockname()[1])
        agg.tick(NOW)
    assert caplog.text.count("cannot serve metrics") == 1
    check_against_current(paths.metrics_file.read_text(), paths)


def test_the_network_figure_is_the_secure_rounds_when_it_leads(tmp_path: Path) -> None:
    """A network in secure mode: network_cpu_* are the latest secure round's (figure_source says so), and a fleet
    percentile the cohort is too small for is not exposed as a number."""
    from shared.privacy import Interval
    from shared.wire.schema import SecureFigure

    fig = SecureFigure(epoch=1, round=88_000_000, round_start=NOW - timedelta(seconds=40),
                       round_end=NOW - timedelta(seconds=20), cohort=5, survivors=5, mean=52.7, standard_error=1.1,
                       ci95_low=50.5, ci95_high=54.9, unit="cpu_window", unit_words="w", epsilon=1.25, delta=0.0,
                       noise="distributed discrete Laplace", method="test", cohort_too_small_for=["p50"],
                       percentiles={"p50": Interval(estimate=10.8, low=0, high=100),
                                    "p90": Interval(estimate=80, low=70, high=90)})

    class Rounds:  # what SecureAggregator exposes to the aggregator
        figure = fig
        epoch = None

        def tick(self, now: datetime) -> bool:
            return True

    paths = Paths(data_dir=tmp_path, email=AGG)
    agg = Aggregator(paths, Settings(aggregator=AGG), Problems(logging.getLogger("t")))
    agg.features["secure"].rounds = Rounds()
    agg.tick(NOW)
    got = samples(paths.metrics_file.read_text())
    assert got[("cpu_tracker_network_cpu_ratio", ())] == pytest.approx(0.527)
    assert got[("cpu_tracker_network_cpu_ci95_high_ratio", ())] == pytest.approx(0.549)
    assert got[("cpu_tracker_figure_published", ())] == 1
    assert got[("cpu_tracker_figure_source", (("source", "secure"),))] == 1
    assert got[("cpu_tracker_figure_source", (("source", "local"),))] == 0
    pct = {k[1]: v for k, v in got.items() if k[0] == "cpu_tracker_secure_fleet_cpu_percentile_ratio"}
    assert set(pct) == {(("bound", b), ("quantile", "90")) for b in ("estimate", "low", "high")}
    agg.tick(NOW + timedelta(minutes=10))  # the round is no longer recent: no network figure
    got = samples(paths.metrics_file.read_text())
    assert got[("cpu_tracker_figure_published", ())] == 0
    assert not [k for k in got if k[0].startswith("cpu_tracker_network_cpu")]
