"""Publishing that scales: what changes every tick stays small, closed history segments are never rewritten,
a tick that changed nothing writes no file, and a reader of the public folder gets the aggregator's series."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import cpu_tracker_aggregator.publish as publish
from cpu_tracker_aggregator.dashboard import add_point, empty_history
from cpu_tracker_aggregator.publish import SEGMENT_S, Publisher, read_history, segment_name, segment_start
from shared.paths import CURRENT_FILE, HISTORY_DIR, HISTORY_INDEX_FILE
from shared.wire.schema import AggregatorSettings, Counts, Dashboard, Estimate, PrivacySummary, Segment
from shared.settings import Settings

AGG = "agg@example.org"
START = datetime(2026, 3, 1, 22, 30, tzinfo=timezone.utc)  # crosses a UTC midnight: both kinds of segment close
TICK = timedelta(seconds=30)  # coarser than the default tick: the same closes, a third of the work


def dashboard_at(now: datetime, history, i: int) -> Dashboard:
    """The dashboard of tick ``i``: a figure that moves, and a gap (too few members) every 97 ticks."""
    settings = Settings(aggregator=AGG)
    est = None if i % 97 == 0 else Estimate(mean=30 + (i % 17), standard_error=0.5, ci95_low=29 + (i % 17),
                                            ci95_high=31 + (i % 17), members=5, method="test")
    return Dashboard(
        app_version="test", generated_at=now, status="ok" if est else "too_few_members", message="m", estimate=est,
        counts=Counts(fresh=5, stale=0, rejected=0, legacy=0), privacy=PrivacySummary(),
        settings=AggregatorSettings(tick_s=10, stale_after_s=60, min_members=3),
        history=add_point(history, now, est, 5, settings),
    )


def test_a_day_of_ticks_never_rewrites_a_closed_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[str, int]] = []
    real_write = publish.atomic_write_bytes

    def recording_write(path, data, **kw):
        writes.append((str(Path(path).relative_to(tmp_path)), clock[0]))
        real_write(path, data, **kw)

    monkeypatch.setattr(publish, "atomic_write_bytes", recording_write)
    clock = [0]
    publisher = Publisher(tmp_path)
    history = empty_history(Settings(aggregator=AGG))
    ticks = int(timedelta(hours=26) / TICK)
    for i in range(ticks):
        now = START + i * TICK
        clock[0] = int(now.timestamp())
        dash = dashboard_at(now, history, i)
        history = dash.history
        publisher.publish(dash, clock[0])
        if i == ticks // 2:  # a restart in the middle: a new publisher on the same folder
            publisher = Publisher(tmp_path)

    segments = {name: [t for n, t in writes if n == f"{HISTORY_DIR}/{name}"]
                for name in os.listdir(tmp_path / HISTORY_DIR)
                if segment_start(name)}
    closed_checked = 0
    for name, times in segments.items():
        series, start = segment_start(name)
        end = start + SEGMENT_S[series]
        after_close = [t for t in times if t >= end]
        assert len(after_close) <= 1, f"{name} rewritten after its period ended: {after_close}"
        if after_close:
            closed_checked += 1
            seg = Segment.model_validate_json((tmp_path / HISTORY_DIR / name).read_bytes())
            full = getattr(history, series)
            expected = [t for t in full.t if start <= t < end]
            if expected and expected[0] == full.t[0]:
                continue  # the oldest segment: the history held no longer holds all of it
            assert [p[0] for p in seg.points] == expected, f"{name} is not its period's points"
    assert closed_checked >= 20  # about 24 closed hours and one closed day
    assert segment_name("coarse", int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp())) in segments

    # per tick: current.json always, segments only when a 5-minute block closes, the index about hourly
    per_file = {}
    for name, _ in writes:
        per_file[name] = per_file.get(name, 0) + 1
    assert per_file[CURRENT_FILE] == ticks
    hour_writes = sum(v for k, v in per_file.items() if "/recent-" in k)
    blocks = ticks * TICK.total_seconds() / publish.BLOCK_S
    assert hour_writes <= blocks + 26  # once per closed block, plus once per hour at its close
    assert per_file[HISTORY_INDEX_FILE] <= 2 * 26 + 4
    assert per_file["dashboard.json"] <= ticks * TICK.total_seconds() / publish.LEGACY_EVERY_S + 2 * ticks / 97 + 2

    # the reader's recipe gives the aggregator's own series (within what it keeps)
    _, seen = read_history(tmp_path)
    for series in ("recent", "coarse"):
        held, read = getattr(history, series), getattr(seen, series)
        rows = zip(read.t, read.mean, read.ci95_low, read.ci95_high, read.members)
        assert [p for p in rows if p[0] >= held.t[0]] == \
            list(zip(held.t, held.mean, held.ci95_low, held.ci95_high, held.members))
    kept = [segment_start(n) for n in os.listdir(tmp_path / HISTORY_DIR) if segment_start(n)]
    newest = int((START + (ticks - 1) * TICK).timestamp())
    assert all(start + SEGMENT_S[s] > newest - publish.RETENTION_S[s] for s, start in kept), "expired segments kept"


def test_a_tick_that_changed_nothing_writes_no_file(tmp_path: Path) -> None:
    from cpu_tracker_aggregator.aggregator import Aggregator
    from cpu_tracker_member.member import build_report
    from shared.atomic import atomic_write_json
    from shared.logs import Problems
    from shared.paths import Paths
    import logging

    paths = Paths(data_dir=tmp_path, email=AGG)
    settings = Settings(aggregator=AGG, min_members=1)
    now = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)

    def write(member: str, seed: int) -> None:
        _, report = build_report(20.0, settings.samples_per_window, now - timedelta(seconds=20), now, settings,
                                 random_state=seed)
        atomic_write_json(paths.report_file(member), report.model_dump(mode="json"))

    write("m1@example.org", 1)
    agg = Aggregator(paths, settings, Problems(logging.getLogger("t")))
    agg.tick(now)

    def files() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()
                and "app_data" not in p.parts}

    before = files()
    agg.tick(now + timedelta(seconds=10))  # nothing new
    assert files() == before
    write("m2@example.org", 2)
    agg.tick(now + timedelta(seconds=20))  # a new member: published
    after = files()
    changed = {k for k in after if after[k] != before.get(k)}
    assert any(k.endswith(CURRENT_FILE) for k in changed) and any(k.endswith("history.json") for k in changed)


def _published_day(folder: Path) -> Dashboard:
    """Two hours of ticks published into ``folder`` by the real Publisher; returns the last dashboard."""
    publisher, history = Publisher(folder), empty_history(Settings(aggregator=AGG))
    for i in range(240):
        now = START + i * TICK
        dash = dashboard_at(now, history, i)
        history = dash.history
        publisher.publish(dash, int(now.timestamp()))
    return dash


def test_the_documented_recipe_reads_what_the_page_and_read_history_read(tmp_path: Path) -> None:
    dash = _published_day(tmp_path)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "dashboard.md").read_text()
    block = doc.split("# with plain json\n", 1)[1].split("```", 1)[0]
    scope = {"public_folder": str(tmp_path), "print": lambda *a: None}
    exec(block, scope)  # noqa: S102 - the documented code, run as a reader would
    _, history = read_history(tmp_path)
    assert [r[0] for r in scope["recent"]] == history.recent.t == dash.history.recent.t
    assert [r[1] for r in scope["recent"]] == history.recent.mean


def test_the_terminal_status_reads_the_public_folder(tmp_path: Path) -> None:
    from cpu_tracker_aggregator.status import status_text

    assert "No figure published yet" in status_text(tmp_path)
    dash = _published_day(tmp_path)
    text = status_text(tmp_path)
    assert dash.message in text and f"mean {dash.estimate.mean:.2f} %" in text and "last hour: |" in text


@pytest.mark.parametrize("stop_at, start_at", [("10:33", "11:10"), ("10:59:50", "11:00:20"), ("23:58", "00:07")])
def test_a_restart_across_a_boundary_completes_the_segment_it_left(tmp_path: Path, stop_at: str, start_at: str) -> None:
    """The segment a stopped aggregator left (its period ended meanwhile) is completed once from the history,
    marked complete, and never written again: a reader misses none of the history's points."""
    day = datetime(2026, 3, 1, tzinfo=timezone.utc)

    def at(text: str) -> datetime:
        t = datetime.strptime(text, "%H:%M:%S" if text.count(":") == 2 else "%H:%M").replace(
            year=day.year, month=day.month, day=day.day, tzinfo=timezone.utc)
        return t if t >= START.replace(hour=0, minute=0) + timedelta(hours=8) else t + timedelta(days=1)

    history = empty_history(Settings(aggregator=AGG))
    now, i = at(stop_at) - timedelta(minutes=40), 1
    publisher = Publisher(tmp_path)
    while now <= at(stop_at):
        dash = dashboard_at(now, history, i)
        history = dash.history
        publisher.publish(dash, int(now.timestamp()))
        now, i = now + timedelta(seconds=10), i + 1
    publisher = Publisher(tmp_path)  # a new process, after the downtime
    for k in range(3):
        now = at(start_at) + timedelta(seconds=10 * k)
        dash = dashboard_at(now, history, i + k)
        history = dash.history
        publisher.publish(dash, int(now.timestamp()))
    _, seen = read_history(tmp_path)
    assert seen.recent.t == history.recent.t and seen.coarse.t == history.coarse.t
    for name in os.listdir(tmp_path / HISTORY_DIR):
        if segment_start(name):
            series, start = segment_start(name)
            seg = Segment.model_validate_json((tmp_path / HISTORY_DIR / name).read_bytes())
            assert seg.complete == (start + SEGMENT_S[series] <= int(now.timestamp()) - int(now.timestamp()) % 300)


def test_secure_rounds_go_into_the_history_segments_and_lead_the_status(tmp_path: Path) -> None:
    """A network in secure mode (no local report at all): each tick's history point is the latest secure round's
    figure with its interval and survivors while that round is recent, a gap once it is not (rounds stopped for 20
    minutes), and again after; closed hour segments hold them; the terminal status leads with the secure round. The
    secure rounds are a stand-in here (their protocol is tests/test_secure_protocol.py's); the aggregator, the
    dashboard, the publisher and the reader are the real ones."""
    import logging

    from cpu_tracker_aggregator.aggregator import Aggregator
    from cpu_tracker_aggregator.dashboard import SECURE_RECENT_ROUNDS
    from cpu_tracker_aggregator.status import status_text
    from shared.logs import Problems
    from shared.paths import Paths
    from shared.privacy import Interval
    from shared.wire.schema import SecureFigure

    window = 20
    settings = Settings(aggregator=AGG)

    class Rounds:  # what SecureAggregator exposes to the aggregator: tick() and the latest figure
        figure: SecureFigure | None = None
        epoch = None

        def tick(self, now: datetime) -> bool:
            r = int(now.timestamp()) // window - 2  # published about two rounds after it ended
            if stopped_from <= now < stopped_until or (self.figure and self.figure.round == r):
                return False
            mean = 20 + r % 50
            self.figure = SecureFigure(
                epoch=1, round=r, round_start=datetime.fromtimestamp(r * window, timezone.utc),
                round_end=datetime.fromtimestamp((r + 1) * window, timezone.utc), cohort=6, survivors=5 + r % 2,
                mean=mean + 0.1234, standard_error=1.0, ci95_low=mean - 2.0, ci95_high=mean + 2.0,
                percentiles={"p50": Interval(estimate=10.0, low=0.0, high=100.0)}, cohort_too_small_for=["p50"],
                unit="cpu_window", unit_words="a member's whole window", epsilon=1.25, delta=0.0,
                noise="distributed discrete Laplace", method="test", min_survivors=5)
            return True

    start = datetime(2026, 3, 1, 10, 0, 5, tzinfo=timezone.utc)
    stopped_from, stopped_until = start + timedelta(minutes=50), start + timedelta(minutes=70)
    agg = Aggregator(Paths(data_dir=tmp_path, email=AGG), settings, Problems(logging.getLogger("t")))
    agg.features["secure"].rounds = rounds = Rounds()
    expected = {}
    for i in range(int(timedelta(hours=2) / TICK)):
        now = start + i * TICK
        dash = agg.tick(now)
        fig = rounds.figure
        recent = (now - fig.round_end).total_seconds() <= SECURE_RECENT_ROUNDS * window + settings.stale_after_s
        assert dash.lead == ("secure" if recent else None) and dash.estimate is None
        assert dash.message.startswith("Network CPU" if recent else "No current figure")
        expected[int(now.timestamp())] = (round(fig.mean, 3), fig.ci95_low, fig.ci95_high, fig.survivors) if recent \
            else (None, None, None, 0)

    folder = agg.paths.public_dir()
    _, history = read_history(folder)
    got = {t: (m, lo, hi, n) for t, m, lo, hi, n in zip(history.recent.t, history.recent.mean,
                                                          history.recent.ci95_low, history.recent.ci95_high,
                                                          history.recent.members)}
    assert {t: got[t] for t in expected if t in got} == {t: v for t, v in expected.items() if t in got}
    # the gap: 20 minutes less the 5 rounds + stale_after_s a figure stays recent, one null point per heartbeat
    assert sum(v[0] is None for t, v in expected.items() if t in got) >= (1200 - 160) // 60 - 2
    assert len([t for t in expected if t in got]) >= 0.9 * len(expected)  # every changed tick, and heartbeats
    closed = Segment.model_validate_json((folder / HISTORY_DIR / segment_name(
        "recent", int(datetime(2026, 3, 1, 10, tzinfo=timezone.utc).timestamp()))).read_bytes())
    assert closed.complete and sum(p[1] is not None for p in closed.points) >= 60
    assert all(p[4] in (5, 6) for p in closed.points if p[1] is not None)  # survivors, not the 0 local reports
    coarse = [m for m in history.coarse.mean if m is not None]
    assert len(coarse) >= 20 and all(20 <= m <= 70 for m in coarse)
    text = status_text(folder)
    assert f"secure round {rounds.figure.round}" in text and "of 6 in the round's sum" in text
    assert "p50 cohort too small for it" in text and "0 fresh" not in text
