"""The aggregator on a fake multi-datasite workspace (syft-core's ``temp_workspace`` idea), no network.

Layout built under ``tmp_path`` (members' reports written with the real ``build_report``, as the member app does):

    workspace/                                     <- data_dir
    ├── datasites/
    │   ├── agg@example.org/                       the aggregator (publishes public/cpu_tracker/dashboard.json)
    │   ├── m0..m3@example.org/app_data/cpu_tracker/cpu_tracker.json      fresh reports
    │   ├── stale@example.org/...                  a valid report whose window ended 10 minutes ago
    │   ├── legacy@example.org/...                 the tutorial's {"cpu", "timestamp"} report
    │   ├── garbled@example.org/...                truncated JSON
    │   ├── symfile@example.org/...                cpu_tracker.json is a symlink to a valid report outside
    │   ├── symdir@example.org/app_data/cpu_tracker -> outside/cpu_tracker (a valid report)
    │   ├── not-an-email/...                       a valid report in a folder whose name is not an email
    │   ├── dirfile@example.org/.../cpu_tracker.json/   a directory where the file should be
    │   └── bystander@example.org/public/          a datasite that does not run the app
    └── private/cpu_tracker/aggregator/            history.json, members.json (never synced)
    outside/                                       files outside the workspace the symlinks point to
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest

import cpu_tracker_aggregator.roster as roster_module
from cpu_tracker_aggregator.aggregator import Aggregator
from cpu_tracker_member.member import build_report
from shared.atomic import atomic_write_json
from shared.logs import Problems
from shared.paths import DASHBOARD_SCHEMA_FILE, REPORT_SCHEMA_FILE, Paths
from shared.wire.catalog import SCHEMA_DIR, json_schemas, schema_text
from shared.wire.schema import Dashboard
from shared.settings import Settings
from tests.conftest import is_synced

AGG = "agg@example.org"
FRESH = [f"m{i}@example.org" for i in range(4)]
START = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
END = START + timedelta(seconds=20)
NOW = END + timedelta(seconds=5)
LEGACY_CPU = 12.3456789  # distinctive: searched for in the dashboard text
EXPECTED_REASONS = {"bad_folder_name": 1, "not_a_file": 1, "not_json": 1, "symlink": 2}
PARSED_PER_FULL_SCAN = len(FRESH) + 3  # fresh + stale + legacy + garbled; the others are refused before parsing


def make_settings(**kw) -> Settings:
    return Settings(aggregator=AGG, **kw)


@dataclass
class Workspace:
    data_dir: Path
    outside: Path
    paths: Paths
    values: dict[str, float] = field(default_factory=dict)  # every released value written anywhere, by owner

    def report_file(self, member: str) -> Path:
        return self.paths.report_file(member)

    def write_report(
        self, member: str, *, level: float, seed: int, end: datetime = END, path: Path | None = None
    ) -> float:
        """Write ``member``'s report (true mean CPU ``level``) as the member app does; returns the released value."""
        s = make_settings()
        _, report = build_report(level, s.samples_per_window, end - timedelta(seconds=s.interval_s), end, s,
                                 random_state=seed)
        atomic_write_json(path or self.report_file(member), report.model_dump(mode="json"))
        self.values[member] = report.release.value
        return report.release.value

    def fresh_values(self) -> list[float]:
        return [self.values[m] for m in FRESH]

    def aggregator(self, **settings) -> Aggregator:
        return Aggregator(self.paths, make_settings(**settings), Problems(logging.getLogger("test.aggregator")))

    def dashboard_text(self) -> str:
        return self.paths.dashboard_file.read_text("utf-8")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    data_dir, outside = tmp_path / "workspace", tmp_path / "outside"
    w = Workspace(data_dir, outside, Paths(data_dir=data_dir, email=AGG))
    for i, member in enumerate(FRESH):
        w.write_report(member, level=10.0 + 20 * i, seed=i)
    w.write_report("stale@example.org", level=50.0, seed=10, end=END - timedelta(minutes=10))
    atomic_write_json(w.report_file("legacy@example.org"), {"cpu": LEGACY_CPU, "timestamp": "2025-01-01 12:00:10"})
    garbled = w.report_file("garbled@example.org")
    garbled.parent.mkdir(parents=True)
    garbled.write_bytes(b'{"cpu": 3')
    # a symlinked report file, pointing at a valid report outside the member's folder
    w.write_report("symfile-target", level=60.0, seed=11, path=outside / "report.json")
    w.report_file("symfile@example.org").parent.mkdir(parents=True)
    w.report_file("symfile@example.org").symlink_to(outside / "report.json")
    # the report folder itself is a symlink to a folder outside the member's folder
    w.write_report("symdir-target", level=70.0, seed=12, path=outside / "cpu_tracker" / "cpu_tracker.json")
    w.paths.report_dir("symdir@example.org").parent.mkdir(parents=True)
    w.paths.report_dir("symdir@example.org").symlink_to(outside / "cpu_tracker", target_is_directory=True)
    w.write_report("not-an-email", level=80.0, seed=13)
    w.report_file("dirfile@example.org").mkdir(parents=True)
    (data_dir / "datasites" / "bystander@example.org" / "public").mkdir(parents=True)
    return w


def all_members() -> list[str]:
    return [*FRESH, "stale@example.org", "legacy@example.org", "garbled@example.org", "symfile@example.org",
            "symdir@example.org", "not-an-email", "dirfile@example.org"]


# ---------------------------------------------------------------------------------------------------
# One tick: counts, estimate, status
# ---------------------------------------------------------------------------------------------------
def test_counts_by_status_and_reason(ws: Workspace) -> None:
    dash = ws.aggregator().tick(NOW)
    c = dash.counts
    assert (c.fresh, c.stale, c.legacy) == (len(FRESH), 1, 1)
    assert c.rejected_by_reason == EXPECTED_REASONS
    assert c.rejected == sum(EXPECTED_REASONS.values())
    assert Dashboard.model_validate_json(ws.dashboard_text()) == dash  # what was published is what tick returned


@pytest.mark.parametrize("min_members", [1, len(FRESH) - 1, len(FRESH)])
def test_ok_at_or_above_min_members_with_the_plain_mean(ws: Workspace, min_members: int) -> None:
    dash = ws.aggregator(min_members=min_members).tick(NOW)
    values = ws.fresh_values()
    assert dash.status == "ok"
    est = dash.estimate
    assert est is not None and est.members == len(FRESH)
    assert est.mean == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-12)
    assert est.ci95_low < est.mean < est.ci95_high
    # four Laplace releases of scale 1: the interval's half width lies between the Gaussian (1.96 * se) and
    # Chebyshev (se / sqrt(0.05)) bounds for the noise of the mean
    half = (est.ci95_high - est.ci95_low) / 2
    se = math.sqrt(len(FRESH) * 2 * 1.0**2) / len(FRESH)
    assert est.standard_error == pytest.approx(se)
    assert 1.9 * se < half < se / math.sqrt(0.05)
    assert f"from {len(FRESH)} members" in dash.message
    assert dash.history.recent.mean == [round(est.mean, 3)]
    assert dash.privacy.epsilon_min == dash.privacy.epsilon_max == make_settings().epsilon
    assert dash.privacy.mechanisms == {"laplace": len(FRESH)}


@pytest.mark.parametrize("min_members", [len(FRESH) + 1, 100])
def test_too_few_members_below_min_members(ws: Workspace, min_members: int) -> None:
    dash = ws.aggregator(min_members=min_members).tick(NOW)
    assert dash.status == "too_few_members"
    assert dash.estimate is None
    assert dash.message.startswith("No figure")
    assert f"{len(FRESH)} fresh" in dash.message and f"at least {min_members}" in dash.message
    assert dash.counts.fresh == len(FRESH)
    published = json.loads(ws.dashboard_text())
    assert published["status"] == "too_few_members" and published["estimate"] is None


# ---------------------------------------------------------------------------------------------------
# Privacy of the publication
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_members", [1, 3, 100])
def test_dashboard_names_no_member_and_no_member_value(ws: Workspace, min_members: int) -> None:
    agg = ws.aggregator(min_members=min_members)
    agg.tick(NOW)
    agg.tick(NOW + timedelta(seconds=10))
    text = ws.dashboard_text()
    assert "@" not in text
    for member in all_members():
        assert member not in text
    for owner, value in ws.values.items():
        assert repr(value) not in text, f"{owner}'s released value {value!r} is in dashboard.json"
    assert repr(LEGACY_CPU) not in text
    # nothing else the aggregator publishes mentions a member either
    for path in ws.paths.public_dir().rglob("*"):
        if path.is_file():
            content = path.read_text("utf-8")
            assert not any(m in content for m in all_members()), path


def test_per_member_status_is_private(ws: Workspace) -> None:
    ws.aggregator().tick(NOW)
    status_file = ws.paths.members_status_file
    assert status_file.is_file()
    assert not is_synced(status_file, ws.data_dir) and not is_synced(ws.paths.history_file, ws.data_dir)
    members = json.loads(ws.paths.members_status_file.read_text())["members"]
    assert set(members) == set(all_members())  # the bystander and the aggregator run no member: not listed
    assert {m: members[m]["status"] for m in FRESH} == dict.fromkeys(FRESH, "fresh")
    assert members[FRESH[0]]["window_end"] == END.isoformat()
    assert members["stale@example.org"]["status"] == "stale"
    assert members["legacy@example.org"]["status"] == "legacy"
    reasons = {m: v["reason"] for m, v in members.items() if v["status"] == "rejected"}
    assert reasons == {
        "garbled@example.org": "not_json",
        "symfile@example.org": "symlink",
        "symdir@example.org": "symlink",
        "not-an-email": "bad_folder_name",
        "dirfile@example.org": "not_a_file",
    }
    assert all(members[m]["detail"] for m in reasons)


# ---------------------------------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------------------------------
def test_history_survives_a_restart(ws: Workspace) -> None:
    t = [NOW + timedelta(seconds=10 * i) for i in range(3)]
    first = ws.aggregator()
    first.tick(t[0])
    ws.write_report(FRESH[0], level=10.0, seed=100)  # a new report: the next tick has a point to add
    before = first.tick(t[1]).history
    second = ws.aggregator()  # a new process on the same workspace
    assert second.history == before
    after = second.tick(t[2]).history
    assert after.recent.t == [int(x.timestamp()) for x in t]
    assert after.recent.t[:2] == before.recent.t and after.recent.mean[:2] == before.recent.mean
    assert None not in after.recent.mean
    assert after.recent.members == [len(FRESH)] * 3


def test_a_tick_without_a_figure_adds_a_null_point(ws: Workspace) -> None:
    agg = ws.aggregator()
    agg.tick(NOW)
    later = NOW + timedelta(minutes=10)  # every report is stale by now
    dash = agg.tick(later)
    # the fresh reports, the stale one and the legacy one: the tutorial's report goes stale by the same rule
    assert dash.status == "too_few_members" and dash.counts.fresh == 0 and dash.counts.stale == len(FRESH) + 2
    assert dash.counts.legacy == 0
    r = dash.history.recent
    assert r.t == [int(NOW.timestamp()), int(later.timestamp())]
    assert r.mean[0] is not None and r.mean[1] is None
    assert r.ci95_low[1] is None and r.ci95_high[1] is None and r.members == [len(FRESH), 0]
    assert json.loads(ws.dashboard_text())["history"]["recent"]["mean"][-1] is None
    assert ws.aggregator().history.recent.mean == r.mean  # the gap survives a restart too


def test_an_unreadable_history_is_set_aside_not_fatal(ws: Workspace) -> None:
    ws.aggregator().tick(NOW)
    ws.paths.history_file.write_text("{not json")
    agg = ws.aggregator()
    assert agg.history.recent.t == []
    assert len(list(ws.paths.history_file.parent.glob("history.unreadable-*"))) == 1
    assert agg.tick(NOW + timedelta(seconds=10)).history.recent.t == [int((NOW + timedelta(seconds=10)).timestamp())]


# ---------------------------------------------------------------------------------------------------
# The stat-signature cache
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def parse_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    real = roster_module.parse_report

    def counting(data: bytes, **kw):
        calls.append(data)
        return real(data, **kw)

    monkeypatch.setattr(roster_module, "parse_report", counting)
    return calls


def test_unchanged_files_are_not_read_again(ws: Workspace, parse_calls: list[bytes]) -> None:
    agg = ws.aggregator()
    first = agg.tick(NOW)
    assert len(parse_calls) == PARSED_PER_FULL_SCAN
    parse_calls.clear()
    second = agg.tick(NOW + timedelta(seconds=10))
    assert parse_calls == []
    assert second.counts == first.counts and second.estimate == first.estimate
    # freshness still follows the (aggregator's) clock without re-reading
    late = agg.tick(NOW + timedelta(seconds=make_settings().stale_after_s + 1))
    assert parse_calls == [] and late.counts.fresh == 0 and late.counts.stale == len(FRESH) + 2


def test_a_changed_file_is_read_again(ws: Workspace, parse_calls: list[bytes]) -> None:
    agg = ws.aggregator()
    agg.tick(NOW)
    parse_calls.clear()
    new_value = ws.write_report(FRESH[0], level=95.0, seed=99)  # atomic replace: new inode
    dash = agg.tick(NOW + timedelta(seconds=1))
    assert len(parse_calls) == 1 and json.loads(parse_calls[0])["release"]["value"] == new_value
    assert dash.estimate.mean == pytest.approx(statistics.fmean(ws.fresh_values()), rel=1e-12)


def test_a_file_rewritten_in_place_is_read_again(ws: Workspace, parse_calls: list[bytes]) -> None:
    agg = ws.aggregator()
    agg.tick(NOW)
    parse_calls.clear()
    garbled = ws.report_file("garbled@example.org")
    st = garbled.stat()
    with open(garbled, "r+b") as f:  # same inode, same size, new mtime
        f.write(b'{"cpx": 3')
    os.utime(garbled, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert garbled.stat().st_ino == st.st_ino and garbled.stat().st_size == st.st_size
    agg.tick(NOW + timedelta(seconds=1))
    assert parse_calls == [b'{"cpx": 3']


def test_new_and_removed_members(ws: Workspace, parse_calls: list[bytes]) -> None:
    agg = ws.aggregator()
    agg.tick(NOW)
    parse_calls.clear()
    ws.report_file("stale@example.org").unlink()
    ws.write_report("new@example.org", level=5.0, seed=20)
    dash = agg.tick(NOW + timedelta(seconds=1))
    assert len(parse_calls) == 1
    assert dash.counts.stale == 0 and dash.counts.fresh == len(FRESH) + 1
    assert "stale@example.org" not in json.loads(ws.paths.members_status_file.read_text())["members"]


def test_a_report_from_the_future_counts_once_the_clock_catches_up(ws: Workspace, parse_calls: list[bytes]) -> None:
    """A report rejected as from the future is parsed once; its cached time is checked again at every tick, and
    once the clock catches up it counts (fresh for stale_after_s from then), without being read again."""
    s = make_settings()
    ahead = NOW + timedelta(seconds=s.future_tolerance_s + 60)
    ws.write_report("skewed@example.org", level=40.0, seed=21, end=ahead)
    agg = ws.aggregator()
    assert agg.tick(NOW).counts.rejected_by_reason.get("future") == 1
    parse_calls.clear()
    acceptable = ahead - timedelta(seconds=s.future_tolerance_s)
    assert agg.tick(acceptable - timedelta(microseconds=1)).counts.rejected_by_reason.get("future") == 1
    dash = agg.tick(acceptable)
    assert parse_calls == [] and "future" not in dash.counts.rejected_by_reason
    assert dash.counts.fresh == len(FRESH) + 1
    assert agg.tick(acceptable + timedelta(seconds=s.stale_after_s)).counts.fresh == 1  # the others went stale
    assert agg.tick(acceptable + timedelta(seconds=s.stale_after_s, microseconds=1)).counts.fresh == 0
    assert parse_calls == []


# ---------------------------------------------------------------------------------------------------
# JSON Schemas
# ---------------------------------------------------------------------------------------------------
def validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("min_members", [3, 100], ids=["ok", "too_few_members"])
def test_dashboard_validates_against_the_committed_schema(ws: Workspace, min_members: int) -> None:
    agg = ws.aggregator(min_members=min_members)
    agg.tick(NOW)
    agg.tick(NOW + timedelta(minutes=10))  # a gap: null points in the history
    validator(DASHBOARD_SCHEMA_FILE).validate(json.loads(ws.dashboard_text()))


def test_member_reports_validate_against_the_committed_schema(ws: Workspace) -> None:
    v = validator(REPORT_SCHEMA_FILE)
    for member in [*FRESH, "stale@example.org"]:
        v.validate(json.loads(ws.report_file(member).read_text()))
    assert not v.is_valid({"cpu": LEGACY_CPU, "timestamp": "2025-01-01 12:00:10"})  # the schema is not vacuous


def test_published_schemas_are_the_committed_ones(ws: Workspace) -> None:
    ws.aggregator().tick(NOW)
    for name in (DASHBOARD_SCHEMA_FILE, REPORT_SCHEMA_FILE):
        assert (ws.paths.public_dir() / name).read_bytes() == (SCHEMA_DIR / name).read_bytes()


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_committed_schemas_match_the_models(name: str) -> None:
    committed = SCHEMA_DIR / name
    assert committed.is_file(), f"{committed} missing: run `python -m shared.wire.catalog`"
    assert committed.read_text() == schema_text(json_schemas()[name]), (
        f"{committed} differs from the pydantic models: run `python -m shared.wire.catalog` and commit the result"
    )


def test_a_symlinked_datasite_folder_is_rejected_not_counted_twice(ws: Workspace) -> None:
    (ws.data_dir / "datasites" / "alias@example.org").symlink_to(
        ws.data_dir / "datasites" / FRESH[0], target_is_directory=True)
    dash = ws.aggregator().tick(NOW)
    assert dash.counts.fresh == len(FRESH)
    assert dash.counts.rejected_by_reason.get("symlink") == EXPECTED_REASONS["symlink"] + 1


# ---------------------------------------------------------------------------------------------------
# Clock trouble: freshness follows the aggregator's clock
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("skew_s", [-240, -60, 60, 240])
def test_member_clock_off_by_minutes_is_counted_while_alive(tmp_path: Path, skew_s: int) -> None:
    """A member whose clock is off by up to 4 minutes (either way) counts while its report keeps changing,
    and goes stale once it stops, after stale_after_s of the aggregator's own time."""
    w = Workspace(tmp_path, tmp_path / "outside", Paths(data_dir=tmp_path, email=AGG))
    agg = w.aggregator(min_members=1)
    now = NOW
    for i in range(3):  # the member publishes every 20 s of real time, stamped with its own skewed clock
        w.write_report(FRESH[0], level=30.0, seed=i, end=now + timedelta(seconds=skew_s))
        assert agg.tick(now).counts.fresh == 1, f"honest member dropped at publish {i}"
        now += timedelta(seconds=20)
    stale_after = make_settings().stale_after_s
    assert agg.tick(now + timedelta(seconds=stale_after - 20)).counts.fresh == 1
    dead = agg.tick(now + timedelta(seconds=stale_after))
    assert (dead.counts.fresh, dead.counts.stale) == (0, 1)


def test_an_old_report_found_at_start_up_is_not_fresh(tmp_path: Path) -> None:
    w = Workspace(tmp_path, tmp_path / "outside", Paths(data_dir=tmp_path, email=AGG))
    s = make_settings()
    w.write_report(FRESH[0], level=30.0, seed=1, end=NOW - timedelta(seconds=s.stale_after_s + s.future_tolerance_s + 1))
    w.write_report(FRESH[1], level=30.0, seed=2, end=NOW - timedelta(seconds=s.stale_after_s + s.future_tolerance_s))
    c = w.aggregator(min_members=1).tick(NOW).counts
    assert (c.fresh, c.stale) == (1, 1)


# ---------------------------------------------------------------------------------------------------
# Issue 9: Sybils, legacy reports, future-dated reports, the too-few-members message
# ---------------------------------------------------------------------------------------------------
def test_a_members_list_counts_only_listed_datasites(ws: Workspace) -> None:
    """With ``members`` set, a valid report from a datasite not on the list is counted as not_member, never
    averaged (so fake datasites cannot dilute or steer the figure)."""
    listed = FRESH[:3]
    dash = ws.aggregator(members=listed, min_members=1).tick(NOW)
    assert dash.counts.fresh == len(listed)
    assert dash.estimate.mean == pytest.approx(statistics.fmean(ws.values[m] for m in listed), rel=1e-12)
    # everyone else with a report is not_member (never read); the folder that is not an email stays bad_folder_name
    assert dash.counts.rejected_by_reason == {"bad_folder_name": 1, "not_member": 7}
    not_members = {m for m, v in json.loads(ws.paths.members_status_file.read_text())["members"].items()
                   if v["reason"] == "not_member"}
    assert not_members == set(all_members()) - set(listed) - {"not-an-email"}
    assert dash.counts.rejected_by_reason["not_member"] == len(not_members)
    assert dash.counts.stale == dash.counts.legacy == 0


def test_without_a_members_list_everyone_counts(ws: Workspace) -> None:
    assert make_settings().members is None
    assert ws.aggregator().tick(NOW).counts.fresh == len(FRESH)


def test_a_members_file_lists_members_with_comments(ws: Workspace, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "members.txt").write_text(f"# the fleet\n{FRESH[0]}\n\n  {FRESH[1]}  # a comment\n")
    monkeypatch.chdir(app)  # SyftBox runs the app in its folder: a relative members_file is read from there
    s = make_settings(members_file="members.txt", members=[FRESH[2]])
    assert set(s.members) == set(FRESH[:3])
    dash = Aggregator(ws.paths, s, Problems(logging.getLogger("test.aggregator"))).tick(NOW)
    assert dash.counts.fresh == 3 and dash.counts.rejected_by_reason["not_member"] >= 1


def test_a_missing_or_bad_members_file_is_a_settings_error_naming_it(tmp_path: Path) -> None:
    from shared.settings import SettingsError, load_settings

    (tmp_path / "cpu_tracker.toml").write_text(f'aggregator = "{AGG}"\nmembers_file = "{tmp_path}/nope.txt"\n')
    with pytest.raises(SettingsError, match="nope.txt"):
        load_settings(tmp_path, environ={})
    (tmp_path / "bad.txt").write_text("alice@example.org\nnot an email\n")
    (tmp_path / "cpu_tracker.toml").write_text(f'aggregator = "{AGG}"\nmembers_file = "{tmp_path}/bad.txt"\n')
    with pytest.raises(SettingsError, match="bad.txt"):
        load_settings(tmp_path, environ={})


def test_a_legacy_report_from_a_dead_machine_goes_stale(ws: Workspace) -> None:
    """The tutorial's report counts as legacy while it is fresh, by the same rule as every report, not forever."""
    agg = ws.aggregator()
    assert agg.tick(NOW).counts.legacy == 1
    s = make_settings()
    dead = agg.tick(NOW + timedelta(seconds=s.stale_after_s + 1)).counts
    assert dead.legacy == 0 and dead.stale == len(FRESH) + 2
    members = json.loads(ws.paths.members_status_file.read_text())["members"]
    assert members["legacy@example.org"]["status"] == "stale"


def _write_legacy(ws: Workspace, member: str, cpu: float, at: datetime) -> Path:
    path = ws.paths.legacy_report_file(member)
    atomic_write_json(path, {"cpu": cpu, "timestamp": at.strftime("%Y-%m-%d %H:%M:%S")})
    return path


def test_tutorial_members_in_api_data_are_counted_as_legacy(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    """Tutorial-era members write api_data/cpu_tracker/cpu_tracker.json: read and counted as legacy (never averaged);
    a member with both an app_data report and an api_data file is counted once, by its app_data report; the tick's
    log line gives the legacy count."""
    from threading import Event

    from cpu_tracker_aggregator.aggregator import run_aggregator

    at = NOW - timedelta(seconds=5)
    path = _write_legacy(ws, "tutorial@example.org", 99.0, at)
    assert path.parts[-3:] == ("api_data", "cpu_tracker", "cpu_tracker.json")
    _write_legacy(ws, FRESH[0], 99.0, at)  # also has an app_data report
    agg = ws.aggregator(min_members=1)
    with caplog.at_level(logging.INFO, logger="cpu_tracker.aggregator"):
        run_aggregator(agg, Event(), wall=lambda: NOW, once=True)
    dash = Dashboard.model_validate_json(ws.dashboard_text())
    assert dash.counts.legacy == 2 and dash.counts.fresh == len(FRESH)
    assert dash.estimate.mean == pytest.approx(statistics.fmean(ws.fresh_values()), rel=1e-12)
    members = json.loads(ws.paths.members_status_file.read_text())["members"]
    assert members["tutorial@example.org"]["status"] == "legacy" and members[FRESH[0]]["status"] == "fresh"
    assert "legacy 2)" in caplog.text
    ws.report_file(FRESH[0]).unlink()  # the app_data report gone: its api_data file is what is left
    c = agg.tick(NOW + timedelta(seconds=1)).counts
    assert (c.fresh, c.legacy) == (len(FRESH) - 1, 3)


def test_an_api_data_symlink_is_refused(ws: Workspace) -> None:
    target = ws.outside / "legacy.json"
    atomic_write_json(target, {"cpu": 50.0, "timestamp": NOW.strftime("%Y-%m-%d %H:%M:%S")})
    ws.paths.legacy_report_file("evil@example.org").parent.mkdir(parents=True)
    ws.paths.legacy_report_file("evil@example.org").symlink_to(target)
    c = ws.aggregator().tick(NOW).counts
    assert c.legacy == 1 and c.rejected_by_reason["symlink"] == EXPECTED_REASONS["symlink"] + 1


def test_an_unchanged_future_report_is_stable_between_ticks(ws: Workspace, parse_calls: list[bytes]) -> None:
    """A future-dated report keeps the same status and detail at every tick: it is parsed once, and members.json is
    not rewritten at every tick because of it."""
    ahead = NOW + timedelta(seconds=make_settings().future_tolerance_s + 3600)
    ws.write_report("skewed@example.org", level=40.0, seed=21, end=ahead)
    agg = ws.aggregator()
    agg.tick(NOW)
    status_file = ws.paths.members_status_file
    first = status_file.read_bytes()
    before = status_file.stat()
    detail = json.loads(first)["members"]["skewed@example.org"]["detail"]
    assert NOW.isoformat() not in detail and ahead.isoformat() in detail
    parse_calls.clear()
    for i in range(1, 6):  # every report stays fresh meanwhile: nothing else changes either
        dash = agg.tick(NOW + timedelta(seconds=i))
        assert dash.counts.rejected_by_reason["future"] == 1
    assert parse_calls == []
    after = status_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "members.json was rewritten"
    assert status_file.read_bytes() == first


def test_the_too_few_members_message_claims_no_protection(ws: Workspace) -> None:
    """min_members does not stop fake datasites from reading one member's release off the figure (two fakes
    reporting known values and one honest member: the mean gives the honest value away), so the message only says
    what is true."""
    dash = ws.aggregator(min_members=100).tick(NOW)
    assert dash.message == f"No figure: {len(FRESH)} fresh member report(s), at least 100 are needed."
    assert "read off" not in dash.message and "single member" not in dash.message


def test_two_fake_datasites_read_one_honest_release_off_the_figure(tmp_path: Path) -> None:
    """The Sybil bound in docs/privacy.md: with min_members = 3, two fake members reporting known values and one
    honest member give a figure from which the honest member's release is recovered exactly."""
    w = Workspace(tmp_path, tmp_path / "outside", Paths(data_dir=tmp_path, email=AGG))
    honest = w.write_report("honest@example.org", level=37.0, seed=5)
    fakes = [w.write_report(f"fake{i}@example.org", level=50.0, seed=6 + i) for i in range(2)]
    dash = w.aggregator(min_members=3).tick(NOW)
    assert dash.status == "ok" and dash.estimate.members == 3
    assert 3 * dash.estimate.mean - sum(fakes) == pytest.approx(honest, abs=1e-9)
    # a members list stops it: the fakes are not_member, and one honest member alone gives no figure
    listed = w.aggregator(min_members=3, members=["honest@example.org"]).tick(NOW)
    assert listed.status == "too_few_members" and listed.counts.rejected_by_reason == {"not_member": 2}


def test_statuses_follow_the_clock_through_many_rewrites(tmp_path: Path) -> None:
    """A member rewriting its report at every tick stays fresh, goes stale stale_after_s after its last report,
    and the roster re-derives nothing for the reports it replaced (their instants are dropped)."""
    w = Workspace(tmp_path, tmp_path / "outside", Paths(data_dir=tmp_path, email=AGG))
    agg = w.aggregator(min_members=1)
    s = make_settings()
    now = NOW
    for i in range(12):
        w.write_report(FRESH[0], level=30.0, seed=i, end=now)
        assert agg.tick(now).counts.fresh == 1
        now += timedelta(seconds=10)
    derived = []
    real = agg.roster._derive
    agg.roster._derive = lambda name, entry, at, new_content=False: derived.append(entry) or real(
        name, entry, at, new_content)
    last = now - timedelta(seconds=10)
    assert agg.tick(last + timedelta(seconds=s.stale_after_s)).counts.fresh == 1
    dead = agg.tick(last + timedelta(seconds=s.stale_after_s, microseconds=1)).counts
    assert (dead.fresh, dead.stale) == (0, 1)
    assert len(derived) == 1  # only the current report's own instant; the 11 replaced ones were skipped


def test_a_bug_in_one_features_tick_is_logged_once_and_the_figure_and_the_other_features_go_on(ws: Workspace, caplog):
    """Secure rounds that raise something unexpected (a bug, not an OSError) at every tick: the local figure is
    published, the private alerts still tick, the bug is logged once with its traceback, and its end once. On main a
    KeyError from the secure rounds escaped the tick (the role restarted 30 s later, the figure stopped meanwhile)."""

    class Broken:  # what SecureAggregator exposes to the aggregator, with a bug in tick
        figure = None
        epoch = None
        broken = True

        def tick(self, now: datetime) -> bool:
            if self.broken:
                raise KeyError("round 7")
            return False

    monitor = {"name": "cpu_high", "kind": "mean", "threshold": 80, "epsilon": 1.0}
    agg = ws.aggregator(monitors=(monitor,))
    agg.features["secure"].rounds = rounds = Broken()
    caplog.set_level(logging.INFO)
    for i in range(3):
        dash = agg.tick(NOW + timedelta(seconds=i))
        assert dash.status == "ok" and dash.estimate is not None
        assert [a.monitor for a in dash.alerts or []] == ["cpu_high"]  # the alerts ticked all the same
    failed = [r for r in caplog.records if "secure rounds failed this tick" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR and failed[0].exc_info is not None
    assert Dashboard.model_validate_json(ws.dashboard_text()).estimate is not None
    rounds.broken = False
    agg.tick(NOW + timedelta(seconds=3))
    assert caplog.text.count("secure rounds running again") == 1
