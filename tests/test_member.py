"""The member: samples the whole window, discards psutil's first reading, keeps the raw mean private,
publishes only what the budget allows, and keeps its folder's permissions as they must be."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from syftbox.lib.permissions import ComputedPermission, PermissionType, SyftPermission

from cpu_tracker_member.member import Member, measure_window, run_member
from shared.privacy.ledger import load_spends
from shared.wire.schema import MemberReport
from shared.paths import Paths
from shared.privacy import Budget
from shared.settings import Settings
from tests.conftest import AGG, FakeClock, FakeWall, is_synced

ME, OTHER = "me@example.org", "other@example.org"


def readings(values):
    """psutil.cpu_percent stand-in: first call (priming) returns 0.0, then ``values`` cycled."""
    it = iter([0.0, *values * 1000])
    return lambda: next(it)


def publish_windows(member: Member, values, windows: int = 1, wall=None) -> None:
    wall = wall or FakeWall()
    read = readings(values)
    for _ in range(windows):  # the monotonic clock jumps a whole window per reading: no real waiting
        run_member(member, threading.Event(), read=read, wall=wall, clock=FakeClock(member.settings.interval_s),
                   once=True)


def test_measure_window_waits_the_interval_then_reads_once():
    t, waits = [0.0], []

    class Stop:
        def wait(self, d):
            waits.append(d)
            t[0] += d
            return False

    reads = iter([42.0, 7.0])
    assert measure_window(20.0, read=lambda: next(reads), clock=lambda: t[0], stop=Stop()) == 42.0
    assert waits == [20.0] and t[0] == 20.0


def test_measure_window_returns_none_when_stopped():
    stop = threading.Event()
    stop.set()
    assert measure_window(5.0, read=lambda: 1.0, stop=stop) is None


def test_first_reading_is_discarded_and_raw_mean_is_private(paths_for, settings, problems):
    paths = paths_for(ME)
    member = Member(paths, settings, problems)
    publish_windows(member, [20.0, 30.0])  # the primer 0.0 is not used: the first window reads 20
    raw = json.loads(paths.raw_file.read_text().splitlines()[-1])
    assert raw["raw_mean"] == 20.0 and raw["n_samples"] == 1  # a 1 s window: one unit of one second
    report = MemberReport.model_validate_json(paths.report_file().read_bytes())
    assert report.window.n_samples == 1 and report.release.value == raw["released"]
    assert report.release.sensitivity == pytest.approx(100.0) and report.release.noise_scale == pytest.approx(20.0)


def test_raw_data_never_enters_the_synced_tree(paths_for, settings, problems):
    """Every file under datasites/ is what SyftBox uploads: none may hold a raw mean or the ledger."""
    paths = paths_for(ME)
    member = Member(paths, settings, problems)
    publish_windows(member, [12.345678, 56.789012, 3.14159], windows=5)
    raws = [json.loads(line)["raw_mean"] for line in paths.raw_file.read_text().splitlines()]
    assert len(raws) == 5
    assert not is_synced(paths.raw_file, paths.data_dir) and not is_synced(paths.ledger_file, paths.data_dir)
    synced = b"".join(p.read_bytes() for p in paths.datasites.rglob("*") if p.is_file())
    for raw in raws:
        assert repr(raw).encode() not in synced and f"{raw:.6f}".encode() not in synced
    assert b"raw_mean" not in synced and b"window_start" not in synced


def _can(rules: list[dict], folder_rel: str, user: str, perm: PermissionType, parent: list[dict] | None = None):
    """Ask syftbox's own permission engine whether ``user`` has ``perm`` on the report."""
    owner = folder_rel.split("/")[0]
    all_rules = []
    if parent is not None:
        all_rules += SyftPermission.from_rule_dicts(Path(owner) / "syftperm.yaml", parent).rules
    all_rules += SyftPermission.from_rule_dicts(Path(folder_rel) / "syftperm.yaml", rules).rules
    computed = ComputedPermission.from_user_rules_and_path(
        rules=all_rules, user=user, path=Path(folder_rel) / "cpu_tracker.json"
    )
    return computed.has_permission(perm)


@pytest.mark.parametrize("parent", [None, [{"path": "**", "user": "*", "permissions": ["read", "write"]}]])
def test_only_the_aggregator_can_read_a_report(paths_for, settings, problems, parent):
    """Evaluated by syftbox's own ComputedPermission, even under a parent folder that grants everyone read."""
    paths = paths_for(ME)
    publish_windows(Member(paths, settings, problems), [5.0])
    rules = yaml.safe_load((paths.report_dir() / "syftperm.yaml").read_text())
    rel = f"{ME}/app_data/cpu_tracker"
    assert _can(rules, rel, AGG, PermissionType.READ, parent)
    assert not _can(rules, rel, AGG, PermissionType.WRITE, parent)
    assert not _can(rules, rel, OTHER, PermissionType.READ, parent)
    assert _can(rules, rel, ME, PermissionType.WRITE, parent)
    pub = yaml.safe_load((paths.report_dir() / "syft.pub.yaml").read_text())
    assert pub["rules"][0]["access"]["read"] == [AGG] and pub["terminal"] is True


def test_tampered_or_deleted_permissions_are_restored(paths_for, settings, problems, caplog):
    paths = paths_for(ME)
    member = Member(paths, settings, problems)
    publish_windows(member, [5.0])
    perm = paths.report_dir() / "syftperm.yaml"
    good = perm.read_bytes()
    perm.write_text("- path: '**'\n  user: '*'\n  permissions: [read]\n")
    (paths.report_dir() / "syft.pub.yaml").unlink()
    publish_windows(member, [5.0])
    assert perm.read_bytes() == good and (paths.report_dir() / "syft.pub.yaml").exists()
    assert "repaired" in caplog.text


def test_deleted_report_folder_is_recreated(paths_for, settings, problems):
    paths = paths_for(ME)
    member = Member(paths, settings, problems)
    publish_windows(member, [5.0])
    for f in paths.report_dir().iterdir():
        f.unlink()
    paths.report_dir().rmdir()
    publish_windows(member, [5.0])
    assert paths.report_file().exists() and (paths.report_dir() / "syftperm.yaml").exists()


def test_release_over_budget_is_never_published(paths_for, settings, problems, caplog):
    paths = paths_for(ME)
    tight = settings.model_copy(update={"budgets": (Budget(horizon_s=3600, epsilon=10.0),)})
    member = Member(paths, tight, problems)
    wall = FakeWall()
    publish_windows(member, [5.0], windows=2, wall=wall)  # 2 x 5 = the whole hourly budget
    before = paths.report_file().read_bytes()
    publish_windows(member, [5.0], windows=3, wall=wall)
    assert paths.report_file().read_bytes() == before
    assert len(load_spends(paths.ledger_file)) == 2
    assert caplog.text.count("release skipped") == 1  # logged once, not once per window


def test_unreadable_ledger_pauses_releases(paths_for, settings, problems, caplog):
    paths = paths_for(ME)
    paths.ledger_file.parent.mkdir(parents=True)
    paths.ledger_file.write_text("{not json\n{}\n")
    publish_windows(Member(paths, settings, problems), [5.0], windows=2)
    assert not paths.report_file().exists()
    assert caplog.text.count("releases paused") == 1


# ---------------------------------------------------------------------------------------------------
# Issue 9: parent permission files, the fixed privacy unit, private file modes
# ---------------------------------------------------------------------------------------------------
UNSAFE_PARENTS = [
    ("", "syftperm.yaml", [{"path": "**", "user": "*", "permissions": ["read"]}], "rule 1"),
    ("app_data", "syftperm.yaml",
     [{"path": "**", "user": ME, "permissions": ["admin"]}, {"path": "**", "user": OTHER, "permissions": ["admin"]}],
     "rule 2"),
    ("", "syftperm.yaml", [{"path": "app_data/**", "user": "*", "permissions": ["read", "write"]}], "rule 1"),
    ("app_data", "syftperm.yaml", [{"path": "cpu_tracker/*.json", "user": "*", "permissions": ["read"]}], "rule 1"),
    ("", "syft.pub.yaml", {"terminal": True, "rules": [{"pattern": "**", "access": {"read": [ME]}}]}, "terminal"),
    ("app_data", "syft.pub.yaml", {"rules": [{"pattern": "**", "access": {"read": ["*@*"]}}]}, "rule 1"),
    ("", "syft.pub.yaml", {"rules": [{"pattern": "app_data/**", "access": {"write": [OTHER]}}]}, "rule 1"),
    ("", "syftperm.yaml", "- path: '**'\n  user: [unclosed\n", "not valid YAML"),
    ("app_data", "syft.pub.yaml", "rules: 7\n", "cannot be understood"),
]
SAFE_PARENTS = [
    ("", "syftperm.yaml", [{"path": "**", "user": ME, "permissions": ["admin", "read", "write", "create"]}]),
    ("", "syftperm.yaml", [{"path": "public/**", "user": "*", "permissions": ["read"]}]),
    ("", "syftperm.yaml", [{"path": "**", "user": "*", "permissions": ["read"], "type": "disallow"}]),
    ("app_data", "syftperm.yaml", [{"path": "**", "user": AGG, "permissions": ["read"]}]),
    ("", "syft.pub.yaml", {"terminal": False, "rules": [{"pattern": "**", "access": {"admin": [ME]}}]}),
    ("", "syft.pub.yaml", {"rules": [{"pattern": "public/**", "access": {"read": ["*"]}}]}),
]


def _write_parent(paths, where: str, name: str, content) -> Path:
    folder = paths.my_datasite / where if where else paths.my_datasite
    folder.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    (folder / name).write_text(text)
    return folder / name


@pytest.mark.parametrize(("where", "name", "content", "rule"), UNSAFE_PARENTS)
def test_an_unsafe_parent_permission_withdraws_the_report_until_fixed(paths_for, settings, problems, caplog,
                                                                     where, name, content, rule):
    """The 0.4.0 relay applies the most recently written permission file on a path, so a broad parent grant
    written after ours leaks the report: the member withdraws it, spends nothing, logs once which file and rule
    to change, and resumes by itself once that is fixed."""
    caplog.set_level(logging.INFO)
    paths = paths_for(ME)
    member = Member(paths, settings, problems)
    wall = FakeWall()
    publish_windows(member, [5.0], wall=wall)
    assert paths.report_file().exists()
    parent = _write_parent(paths, where, name, content)
    publish_windows(member, [5.0], windows=3, wall=wall)
    assert not paths.report_file().exists(), "the report stayed where a parent grant lets others read it"
    assert len(load_spends(paths.ledger_file)) == 1, "budget spent while nothing could be published"
    logged = [r.getMessage() for r in caplog.records if "withdrawn" in r.getMessage()]
    assert len(logged) == 1 and str(parent) in logged[0] and rule in logged[0]
    parent.unlink()
    publish_windows(member, [5.0], windows=2, wall=wall)
    assert paths.report_file().exists() and len(load_spends(paths.ledger_file)) == 3
    assert caplog.text.count("safe again: releases resume") == 1


@pytest.mark.parametrize(("where", "name", "content"), SAFE_PARENTS)
def test_a_parent_that_grants_nobody_else_the_report_changes_nothing(paths_for, settings, problems, where, name,
                                                                    content):
    paths = paths_for(ME)
    _write_parent(paths, where, name, content)
    publish_windows(Member(paths, settings, problems), [5.0])
    assert paths.report_file().exists()


def test_an_unsafe_parent_at_start_withdraws_a_report_left_from_before(paths_for, settings, problems):
    paths = paths_for(ME)
    publish_windows(Member(paths, settings, problems), [5.0])
    _write_parent(paths, "", "syftperm.yaml", [{"path": "**", "user": "*", "permissions": ["read"]}])
    stop = threading.Event()
    stop.set()  # stopped before the first window ends: only the start-up runs
    run_member(Member(paths, settings, problems), stop, read=readings([5.0]), wall=FakeWall(), clock=FakeClock())
    assert not paths.report_file().exists()


def test_the_parent_leak_is_real_under_syftbox_write_order(paths_for, settings, problems):
    """syftbox's own engine applying the files in write order (as the 0.4.0 server does): a parent grant written
    after our file lets anyone read: why our own file alone cannot protect the report."""
    paths = paths_for(ME)
    publish_windows(Member(paths, settings, problems), [5.0])
    ours = yaml.safe_load((paths.report_dir() / "syftperm.yaml").read_text())
    parent = [{"path": "**", "user": "*", "permissions": ["read"]}]
    rel = f"{ME}/app_data/cpu_tracker"
    rules = (SyftPermission.from_rule_dicts(Path(rel) / "syftperm.yaml", ours).rules
             + SyftPermission.from_rule_dicts(Path(ME) / "syftperm.yaml", parent).rules)  # parent written last
    computed = ComputedPermission.from_user_rules_and_path(rules=rules, user=OTHER,
                                                           path=Path(rel) / "cpu_tracker.json")
    assert computed.has_permission(PermissionType.READ)


def test_the_privacy_unit_does_not_move_with_the_settings(paths_for, problems):
    """sample_period_s and interval_s change between restarts: the noise per second of activity stays, and the
    budgets bind in the one fixed unit (the ledger sums like with like)."""
    paths = paths_for(ME)
    wall = FakeWall(step=20.0)
    budget = (Budget(horizon_s=3600, epsilon=20.0),)
    scales = []
    for kw in ({"sample_period_s": 0.1}, {"sample_period_s": 0.01}, {"interval_s": 10.0}, {"interval_s": 40.0}):
        s = Settings(aggregator=AGG, budgets=budget, **{"interval_s": 20.0, **kw})
        member = Member(paths, s, problems)  # a restart with the new settings
        publish_windows(member, [5.0], wall=wall)
        report = MemberReport.model_validate_json(paths.report_file().read_bytes())
        assert report.privacy_unit.name == "cpu_second" and report.privacy_unit.seconds == 1.0
        assert report.window.sample_period_s == 1.0
        assert report.window.n_samples == int(s.interval_s)
        scales.append(report.release.noise_scale * s.interval_s)  # noise scale x seconds: epsilon per second
    assert scales == pytest.approx([scales[0]] * 4)  # 100 / epsilon: the same, whatever the sample period
    spends = load_spends(paths.ledger_file)
    assert [x.unit for x in spends] == ["cpu_second"] * 4 and sum(x.epsilon for x in spends) == 20.0
    wall.step = timedelta(seconds=20)
    for kw in ({"sample_period_s": 0.01}, {"interval_s": 1.0}):  # the hour holds 20: nothing more, either way
        publish_windows(Member(paths, Settings(aggregator=AGG, budgets=budget, **kw), problems), [5.0], wall=wall)
    assert len(load_spends(paths.ledger_file)) == 4


def test_an_old_sample_unit_report_is_still_accepted():
    from cpu_tracker_aggregator.validate import parse_report

    old = {"schema_version": 1, "kind": "cpu_tracker.member_report", "app_version": "0.1.0",
           "created_at": "2026-01-01T00:00:20Z", "metric": "cpu_percent_mean", "bounds": [0.0, 100.0],
           "window": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:00:20Z", "n_samples": 200,
                      "sample_period_s": 0.1},
           "release": {"mechanism": "laplace", "value": 12.5, "epsilon": 0.5, "delta": 0.0, "sensitivity": 0.5,
                       "noise_scale": 1.0, "noise_std": 2 ** 0.5, "implementation": "diffprivlib 0.6.6"},
           "privacy_unit": {"name": "cpu_sample", "seconds": 0.1, "description": "one sample"},
           "cpu": 12.5, "timestamp": "2026-01-01 00:00:20"}
    now = datetime(2026, 1, 1, 0, 0, 25, tzinfo=timezone.utc)
    accepted = parse_report(json.dumps(old).encode(), now=now, settings=Settings(aggregator=AGG))
    assert accepted.kind == "report" and accepted.privacy_unit_s == 0.1 and accepted.noise_scale == 1.0


def test_private_files_are_private_under_an_open_umask(tmp_path, settings, problems):
    """Ledger, raw values, the aggregator's members.json and history: 0600 in 0700 folders, whatever the umask;
    the report and permission files stay 0644 (SyftBox and the aggregator read them)."""
    from cpu_tracker_aggregator.aggregator import Aggregator

    old = os.umask(0)
    try:
        paths = Paths(data_dir=tmp_path, email=ME)
        publish_windows(Member(paths, settings, problems), [5.0], windows=2)
        agg = Paths(data_dir=tmp_path, email=AGG)
        Aggregator(agg, Settings(aggregator=AGG, min_members=1), problems).tick(datetime(2026, 1, 1, 0, 0, 3,
                                                                                         tzinfo=timezone.utc))
    finally:
        os.umask(old)
    for f in (paths.ledger_file, paths.raw_file, agg.members_status_file, agg.history_file):
        assert _mode(f) == 0o600, f
        assert _mode(f.parent) == 0o700, f.parent
    for f in (paths.report_file(), paths.report_dir() / "syftperm.yaml", agg.dashboard_file):
        assert _mode(f) == 0o644, f


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_status_speaks_the_fixed_unit_in_sentences(paths_for, settings, problems):
    from cpu_tracker_member.status import status_text

    paths = paths_for(ME)
    publish_windows(Member(paths, settings, problems), [5.0])
    text = status_text(paths, Settings(aggregator=AGG), datetime(2026, 1, 1, 0, 0, 2, tzinfo=timezone.utc))
    assert "per 0 s span" not in text
    assert "Budget at most 10 epsilon on any single instant: 0 spent at this instant, 10 left." in text
    assert "Budget at most 1000 epsilon on any span of 1 hour: 5 spent in the last 1 hour, 995 left." in text
    assert "Budget at most 24000 epsilon on any span of 1 day: 5 spent in the last 1 day, 23995 left." in text
    assert "5-differentially private for any one second of this machine's CPU activity" in text
    assert "activity lasting 1 minute" in text and "epsilon <= 300" in text
