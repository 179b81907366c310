"""The member: samples the whole window, discards psutil's first reading, keeps the raw mean private,
publishes only what the budget allows, and keeps its folder's permissions as they must be."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from syftbox.lib.permissions import ComputedPermission, PermissionType, SyftPermission

from cpu_tracker_member.member import Member, measure_window, run_member
from shared.ledger import load_spends
from shared.schema import MemberReport
from shared.settings import Budget
from tests.conftest import AGG, FakeClock, FakeWall, is_synced

ME, OTHER = "me@example.org", "other@example.org"


def readings(values):
    """psutil.cpu_percent stand-in: first call (priming) returns 0.0, then ``values`` cycled."""
    it = iter([0.0, *values * 1000])
    return lambda: next(it)


def publish_windows(member: Member, values, windows: int = 1, wall=None) -> None:
    wall = wall or FakeWall()
    read = readings(values)
    for _ in range(windows):
        run_member(member, threading.Event(), read=read, wall=wall, clock=FakeClock(), once=True)


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
