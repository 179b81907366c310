"""Private alerts over SyftBox files, without a relay: three members and an aggregator in their own data folders,
the files the relay would carry copied by hand (``sync``), real diffprivlib noise with fixed seeds."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cpu_tracker_aggregator.aggregator import Aggregator
from cpu_tracker_aggregator.status import status_text
from cpu_tracker_member.member import Member
from cpu_tracker_member.monitor import MemberMonitors
from shared.privacy import Budget
from shared.privacy import safezone as sz
from shared.privacy.ledger import load_spends
from shared.logs import Problems
from shared.paths import Paths
from shared.wire.catalog import SCHEMA_DIR
from shared.wire.schema import Current, Dashboard, MonitorSignalsFile
from shared.settings import Settings

AGG = "agg@example.org"
MEMBERS = ["m1@example.org", "m2@example.org", "m3@example.org"]
T0 = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
MONITOR = {"name": "cpu_high", "threshold": 90, "margin": 5, "window": 2, "epsilon": 300, "violations": 3}
INTERVAL = 2.0


class Net:
    def __init__(self, root: Path, monitors: list, caplog=None, violations_override=None):
        self.root = root
        self.now = T0
        self.agg_paths = Paths(root / "agg", AGG)
        self.agg = Aggregator(self.agg_paths, Settings(aggregator=AGG, role="aggregator", monitors=tuple(monitors),
                                                       stale_after_s=10, min_members=3),
                              Problems(logging.getLogger("cpu_tracker.aggregator")))
        ms = Settings(aggregator=AGG, interval_s=INTERVAL, budgets=(Budget(horizon_s=0, epsilon=1000.0),),
                      monitor_budgets=(Budget(horizon_s=0, epsilon=1000.0),))
        self.members = {}
        for i, m in enumerate(MEMBERS):
            member = Member(Paths(root / m.split("@")[0], m), ms, Problems(logging.getLogger("cpu_tracker.member")))
            self.members[m] = (member, MemberMonitors(member, random_state=np.random.RandomState(100 + i)))

    def round(self, cpu: dict[str, float] | float) -> Dashboard:
        start, self.now = self.now, self.now + timedelta(seconds=INTERVAL)
        for m, (member, monitors) in self.members.items():
            raw = cpu[m] if isinstance(cpu, dict) else cpu
            member.publish(raw, start, self.now)
            monitors.step(raw, start, self.now)
        self.sync()
        dash = self.agg.tick(self.now)
        self.sync()
        return dash

    def sync(self) -> None:
        """What the relay carries: each member's report folder to the aggregator; the public monitors file to
        everyone; each member's own zones folder to that member only."""
        for m, (member, _) in self.members.items():
            _copy(member.paths.report_dir(), self.agg_paths.report_dir(m))
            _copy(self.agg_paths.public_dir(), member.paths.public_dir(AGG))
            _copy(self.agg_paths.zones_dir(m), member.paths.zones_dir(m, AGG))

    def alert(self, dash: Dashboard) -> dict:
        assert dash.alerts is not None
        return dash.alerts[0].model_dump(mode="json")


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)


def track_of(monitors: MemberMonitors, name: str = "cpu_high"):
    """The member's track of the generation the aggregator names now."""
    return monitors.tracks[monitors.current[name]]


def true_mean(history: list[float], k: int) -> float:
    return float(np.mean(history[-k:]))


@pytest.fixture
def net(tmp_path):
    return Net(tmp_path, [MONITOR])


def test_the_alert_fires_within_two_rounds_of_the_crossing_and_clears(net):
    levels = [20.0] * 8 + [100.0] * 8 + [20.0] * 8
    states, crossings = [], []
    for i, level in enumerate(levels):
        dash = net.round(level)
        states.append(net.alert(dash)["state"])
        crossings.append(true_mean(levels[: i + 1], MONITOR["window"]) >= MONITOR["threshold"])
    assert states[0] == "starting" and "ok" in states[:8]  # the first vectors, collected for stale_after_s
    up = crossings.index(True)
    down = up + crossings[up:].index(False)
    fired = states.index("firing")
    cleared = fired + states[fired:].index("ok")
    assert up <= fired <= up + 2, (states, up)
    assert down <= cleared <= down + 2, (states, down)
    a = net.alert(dash)
    assert a["violation_rounds_used"] == 2 and a["violation_rounds"] == 3 and a["members"] == 3
    # flags the fleet raises together are shared: nobody muted
    assert net.agg.features["alerts"].runs["cpu_high"].muted == []


def test_every_spend_is_in_the_ledger_and_matches_the_published_epsilon(net):
    for level in [20.0] * 8 + [100.0] * 5:
        dash = net.round(level)
    a = net.alert(dash)
    s = sz.split(sz.MonitorSpec(**MONITOR))
    spent = []
    for m, (member, monitors) in net.members.items():
        spends = load_spends(member.paths.ledger_file)
        mine = [x for x in spends if x.mechanism.startswith("safezone_")]
        track = track_of(monitors)
        instances = {x.mechanism: x.epsilon for x in mine}  # a zone's lines (one per window it used) share an id
        assert sum(m.startswith("safezone_vector:cpu_high:") for m in instances) == track.vectors
        assert sum(m.startswith("safezone_zone:cpu_high:") for m in instances) == track.zones
        n = member.settings.samples_per_window  # charged per second of activity: epsilon / whole seconds
        assert sum(instances.values()) * n == pytest.approx(sz.Account(track.vectors, track.zones).spent(s))
        assert all(x.unit == "cpu_second" for x in mine)
        for m in instances:  # each zone's lines follow each other without a gap or an overlap
            lines = [x for x in mine if x.mechanism == m]
            assert all(a.window_end == b.window_start for a, b in zip(lines, lines[1:]))
        spent.append(sz.Account(track.vectors, track.zones).spent(s))
    # one violation round so far: two vectors and two zones, what every member taking part in every round spent
    assert a["violation_rounds_used"] == 1
    assert a["epsilon_spent"] == pytest.approx(2 * s.vector + 2 * s.zone) == pytest.approx(max(spent))


def test_files_and_permissions_reach_only_whom_they_must(net):
    for level in [20.0] * 8:
        net.round(level)
    for m in MEMBERS:
        folder = net.agg_paths.zones_dir(m)
        rules = yaml.safe_load((folder / "syftperm.yaml").read_text())
        readers = {r["user"] for r in rules if r.get("type") != "disallow" and "read" in r["permissions"]}
        assert readers == {AGG, m}
        assert yaml.safe_load((folder / "syft.pub.yaml").read_text())["rules"][0]["access"]["read"] == [m]
        zones = json.loads((folder / "zones.json").read_text())
        assert zones["member"] == m and zones["zones"][0]["monitor"] == "cpu_high"
        jsonschema.validate(zones, json.loads((SCHEMA_DIR / "safe_zones.schema.json").read_text()))
        raw = json.loads(net.agg_paths.monitor_signals_file(m).read_text())
        jsonschema.validate(raw, json.loads((SCHEMA_DIR / "monitor_signals.schema.json").read_text()))
        signals = MonitorSignalsFile.model_validate(raw)
        assert signals.signals[0].vector is not None
    public = "".join(p.read_text() for p in net.agg_paths.public_dir().rglob("*.json"))
    assert "@" not in public  # no member email, no per-member vector in anything public
    monitors = json.loads(net.agg_paths.monitors_file().read_text())
    jsonschema.validate(monitors, json.loads((SCHEMA_DIR / "monitors.schema.json").read_text()))
    assert "vector" not in monitors["monitors"][0]


def test_dashboard_current_status_and_prometheus_agree(net):
    for level in [20.0] * 8 + [100.0] * 4:
        dash = net.round(level)
    cur = Current.model_validate_json(net.agg_paths.current_file.read_bytes())
    legacy = Dashboard.model_validate_json(net.agg_paths.dashboard_file.read_bytes())
    assert cur.alerts == legacy.alerts == dash.alerts
    a = cur.alerts[0]
    assert a.state == "firing" and a.firing
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(net.agg_paths.metrics_file.read_text()) for s in f.samples}
    lab = (("monitor", "cpu_high"),)
    assert got[("cpu_tracker_monitor_firing", lab)] == 1
    assert got[("cpu_tracker_monitor_exhausted", lab)] == 0
    assert got[("cpu_tracker_monitor_state", (("monitor", "cpu_high"), ("state", "firing")))] == 1
    assert got[("cpu_tracker_monitor_violation_rounds_used", lab)] == a.violation_rounds_used
    assert got[("cpu_tracker_monitor_violation_rounds", lab)] == a.violation_rounds
    assert got[("cpu_tracker_monitor_epsilon_spent", lab)] == pytest.approx(a.epsilon_spent)
    assert got[("cpu_tracker_monitor_epsilon", lab)] == a.epsilon
    assert got[("cpu_tracker_monitor_since_timestamp_seconds", lab)] == a.since.timestamp()
    assert got[("cpu_tracker_monitor_threshold_ratio", lab)] == pytest.approx(0.9)
    assert got[("cpu_tracker_monitor_estimate_ratio", lab)] == pytest.approx(a.estimate / 100)
    assert "alert cpu_high: FIRING" in status_text(net.agg_paths.public_dir())


def test_b_violation_rounds_then_exhausted_and_silent(tmp_path):
    net = Net(tmp_path, [{**MONITOR, "violations": 1}])
    for level in [20.0] * 8 + [100.0] * 6:
        dash = net.round(level)
    a = net.alert(dash)
    assert a["state"] == "exhausted" and a["firing"] is True and a["violation_rounds_used"] == 1
    before = {m: len(load_spends(mem.paths.ledger_file)) for m, (mem, _) in net.members.items()}
    for level in [20.0] * 6:
        dash = net.round(level)
    assert net.alert(dash)["state"] == "exhausted"
    for m, (member, monitors) in net.members.items():
        spends = load_spends(member.paths.ledger_file)
        assert len(spends) - before[m] == 6  # only the continuous releases: the monitor spends nothing more
        t = track_of(monitors)
        assert (t.vectors, t.zones) <= (2, 1)


def test_a_bad_monitor_setting_is_refused_once_and_the_rest_runs(tmp_path, caplog):
    net = Net(tmp_path, [{"name": "bad", "threshold": 120}, MONITOR, {"kind": "imbalance"}])
    for level in [20.0] * 8:
        dash = net.round(level)
    assert caplog.text.count("monitors[0] ('bad') is refused and does not run: threshold") == 1
    assert caplog.text.count("monitors[2] is refused") == 1
    assert [a.monitor for a in dash.alerts] == ["cpu_high"] and dash.alerts[0].state == "ok"
    assert dash.estimate is not None  # the network figure goes on


def test_a_malformed_safe_zone_keeps_the_member_silent_and_says_why(net, caplog):
    for level in [20.0] * 8:
        net.round(level)
    m = MEMBERS[0]
    member, monitors = net.members[m]
    zone_file = member.paths.zones_file(m, AGG)
    net.sync = lambda: None  # the relay stops carrying files: the broken zone stays as it is
    zone_file.write_text('{"kind": "cpu_tracker.safe_zones", "zones": [')
    before = track_of(monitors).model_copy()
    for _ in range(3):
        start, net.now = net.now, net.now + timedelta(seconds=INTERVAL)
        assert member.publish(100.0, start, net.now) is not None  # releases go on
        monitors.step(100.0, start, net.now)
    assert caplog.text.count("staying silent for this monitor until it can be read") == 1
    assert "is refused (not a SafeZonesFile" in caplog.text
    assert track_of(monitors) == before  # no check, no spend, no flag
    zone_file.unlink()
    zone_file.mkdir()  # a folder where the file should be: cannot be read
    start, net.now = net.now, net.now + timedelta(seconds=INTERVAL)
    monitors.step(100.0, start, net.now)
    assert "cannot read my safe zone" in caplog.text


def test_a_malformed_member_file_is_refused_once_and_the_others_count(net, caplog):
    for level in [20.0] * 4:
        net.round(level)
    bad = net.agg_paths.monitor_signals_file(MEMBERS[0])
    net.sync = lambda: None
    bad.write_text('{"kind": "cpu_tracker.monitor_signals", "signals": 5}')
    for _ in range(2):
        net.now += timedelta(seconds=INTERVAL)
        dash = net.agg.tick(net.now)
    assert caplog.text.count(f"the monitor file of {MEMBERS[0]} is refused") == 1
    assert dash.alerts[0].state in ("starting", "ok")


def test_a_member_refuses_more_than_its_monitor_budget_whatever_the_aggregator_asks(net, caplog):
    for level in [20.0] * 8:
        net.round(level)
    member, monitors = net.members[MEMBERS[0]]
    track_of(monitors).vectors = MONITOR["violations"] + 1  # as if b + 1 vectors were sent
    defs = json.loads(net.agg_paths.monitors_file().read_text())
    defs["monitors"][0].update(phase="collecting", epoch=7)
    member.paths.monitors_file(AGG).write_text(json.dumps(defs))
    before = len(load_spends(member.paths.ledger_file))
    monitors.step(20.0, net.now, net.now + timedelta(seconds=INTERVAL))
    assert len(load_spends(member.paths.ledger_file)) == before
    assert "noisy vectors are spent; no more are sent" in caplog.text


def test_monitors_members_cannot_afford_are_said_at_start(tmp_path, caplog):
    Net(tmp_path, [{**MONITOR, "epsilon": 1000}])  # 1000 / 20 s windows = 50 per second: over the default 10
    assert "members with these settings will refuse some of their spends" in caplog.text


def test_the_hourly_line_and_status_state_the_figure_composed_with_the_alerts(net):
    from cpu_tracker_member.member import hourly_line
    from cpu_tracker_member.status import status_text

    for level in [20.0] * 8:
        net.round(level)
    member, _ = net.members[MEMBERS[0]]
    line = hourly_line(member.settings, member.keeper.spends, {"windows": 8, "published": 8, "epsilon": 40}, net.now.timestamp())
    # one vector (300 / 12 per window mean) and one zone (2 x 300 / 9) on the same seconds, 2 s windows: per second
    alerts = (300 / 12 + 2 * 300 / 9) / 2
    assert f"one second of activity cost up to epsilon {5 + alerts:.4g} here (releases 5 + alerts {alerts:.3g})" \
        in line
    assert f"epsilon {5 + alerts:.4g}" in status_text(member.paths, member.settings, net.now)


def test_the_composed_figure_for_each_secure_unit():
    from cpu_tracker_member.monitor import composed_words
    from shared.privacy.ledger import Spend

    def line(mech, a, b, eps):
        return Spend(released_at=T0 + timedelta(seconds=b), window_start=T0 + timedelta(seconds=a),
                     window_end=T0 + timedelta(seconds=b), epsilon=eps, mechanism=mech, n_samples=20)

    spends = [line("safezone_vector:x:1", 0, 900, 0.1), line("safezone_zone:x:2", 0, 920, 0.2),
              line("safezone_zone:x:2", 920, 940, 0.2), line("laplace", 900, 920, 5.0)]
    end = T0 + timedelta(seconds=940)
    common = {"aggregator": AGG, "mode": "secure"}
    second = composed_words(Settings(**common, secure_unit="cpu_second"), spends, T0, end)
    assert "one second of activity cost up to epsilon 5.3 here (releases 5 + alerts 0.3)" in second
    window = composed_words(Settings(**common, secure_unit="cpu_window"), spends, T0, end)
    assert "one window (20 s) of activity cost up to epsilon 7.25 here (releases 1.25 + alerts 6)" in window
    assert composed_words(Settings(**common, secure_unit="cpu_day"), spends, T0, end) is None  # day_check composes
    assert composed_words(Settings(aggregator=AGG), spends[3:], T0, end) is None  # no alert spent: nothing to say


def test_flags_that_arrive_after_their_round_started_share_it(net):
    """Members run unsynchronised: the first flag starts the round, the others' flags for the same epoch come a tick
    later. The first flagger alone is muted for that tick; once the others' flags arrive the round is shared and
    nobody is."""
    for level in [20.0] * 8:
        net.round(level)
    net.round(100.0)  # half of the sliding window at 100 %: still inside every zone
    run = net.agg.features["alerts"].runs["cpu_high"]
    assert run.phase == "monitoring" and run.used == 0
    start, net.now = net.now, net.now + timedelta(seconds=INTERVAL)
    for m, (member, monitors) in net.members.items():  # the load arrives everywhere: every member leaves its zone
        member.publish(100.0, start, net.now)
        monitors.step(100.0, start, net.now)
    first = MEMBERS[0]
    _copy(net.members[first][0].paths.report_dir(), net.agg_paths.report_dir(first))  # only its flag has arrived
    net.agg.tick(net.now)
    assert run.used == 1 and run.flaggers[run.epoch - 1] == [first] and run.muted == [first]
    net.sync()
    net.agg.tick(net.now + timedelta(seconds=1))
    assert run.flaggers[run.epoch - 1] == MEMBERS and run.muted == []


def test_a_ledger_corrupted_under_a_monitor_spend_pauses_every_release_said_once(net, caplog):
    """Issue 20: the monitors' copy of the charge reported LedgerCorrupt as its own trouble and left the ledger in
    use, so the releases met it again and said it again. Now whichever spender meets it first pauses them all, said
    once with what to do, never as a traceback."""
    for level in [20.0] * 8:
        net.round(level)
    member, monitors = net.members[MEMBERS[0]]
    spent = len(load_spends(member.paths.ledger_file))
    net.round(20.0)
    assert len(load_spends(member.paths.ledger_file)) > spent + 1  # the monitor too spends each round
    with member.paths.ledger_file.open("a") as f:
        f.write("{not json\n")
    start, end = net.now, net.now + timedelta(seconds=INTERVAL)
    monitors.step(20.0, start, end)  # the monitor's charge meets it first
    assert caplog.text.count("is unreadable") == 1
    assert member.publish(20.0, start, end) is None
    assert caplog.text.count("is unreadable") == 1 and "releases paused" in caplog.text
    assert "Traceback" not in caplog.text and "private alerts failed" not in caplog.text
