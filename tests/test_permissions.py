"""Permissions that fail closed, in the member's own workspace (no relay record: the fallback the Go client gets):
withdrawal removes every file the member published and says so once; a permission file that is not a regular file,
an odd name, a ``{useremail}`` rule; what each kind of rule lets whom read (``rule_readers``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import pytest
import yaml

from cpu_tracker_member.member import Member, run_member
from shared.logs import Problems
from shared import permissions
from shared.paths import SYFT_PUB_FILE, SYFTPERM_FILE, Paths
from shared.permissions import (
    PermissionGuard,
    Rule,
    ensure_permissions,
    parse_permission_file,
    permission_files,
    parse_sync_state,
    rule_readers,
)
from shared.settings import Settings
from tests.conftest import AGG, FakeClock, FakeWall
from tests.special_files import make_fifo, make_socket

ME, OTHER = "me@example.org", "other@example.org"
GRANT = yaml.safe_dump([{"path": "**", "user": "*", "permissions": ["read"]}])


def _member(tmp_path: Path) -> Member:
    return Member(Paths(tmp_path, ME), Settings(aggregator=AGG, interval_s=1.0),
                  Problems(logging.getLogger("test.permissions")))


def _window(member: Member, wall: FakeWall) -> None:
    reads = iter([0.0, 12.5])
    run_member(member, threading.Event(), read=lambda: next(reads), wall=wall, clock=FakeClock(1.0), once=True)


def test_withdrawal_removes_every_file_the_member_published_and_says_so_once(tmp_path, caplog) -> None:
    """The report, monitor.json, the secure key and every round file go; a file the member did not write stays."""
    member, wall = _member(tmp_path), FakeWall()
    _window(member, wall)
    p = member.paths
    published = [p.report_file(), p.monitor_signals_file(), p.secure_join_file(), p.answers_file(), p.upload_file(7),
                 p.upload_file(8)]
    for f in published[1:]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    foreign = p.report_dir() / "notes.txt"
    foreign.write_text("not the app's")
    grant = p.my_datasite / "app_data" / "syftperm.yaml"
    grant.write_text(GRANT)
    for _ in range(3):
        _window(member, wall)
    assert [f for f in published if f.exists()] == [] and foreign.exists()
    said = [r.getMessage() for r in caplog.records if "withdrawn" in r.getMessage()]
    assert len(said) == 1 and str(grant) in said[0] and "rule 1" in said[0], said
    grant.unlink()
    _window(member, wall)
    assert p.report_file().exists()


NOT_FILES = {"a FIFO": make_fifo, "a socket": make_socket, "a folder": lambda p: p.mkdir(),
             "a symbolic link": lambda p: p.symlink_to("/etc/hostname")}


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
@pytest.mark.parametrize("name", ["syftperm.yaml", "notes.syftperm.yaml", "syft.pub.yaml"])
def test_a_permission_file_that_cannot_be_read_counts_as_a_grant(tmp_path, caplog, kind, name) -> None:
    """In app_data/: what the relay makes of it is unknown, so nothing is published until it is a file again."""
    member, wall = _member(tmp_path), FakeWall()
    _window(member, wall)
    target = member.paths.my_datasite / "app_data" / name
    NOT_FILES[kind](target)
    _window(member, wall)
    assert not member.paths.report_file().exists() and str(target) in member.exposed


def test_an_odd_named_file_seen_then_removed_is_remembered_without_a_client_record(tmp_path) -> None:
    """Without the client's record (the Go client), a ``notes.syftperm.yaml`` the member saw may have left its rules
    on a 0.4.0 relay: the member withholds until the folder's syftperm.yaml is written after it (in its own folder
    it does that itself)."""
    member, wall = _member(tmp_path), FakeWall()
    _window(member, wall)
    app_data = member.paths.my_datasite / "app_data"
    notes = app_data / "notes.syftperm.yaml"
    notes.write_text(yaml.safe_dump([{"path": "**", "user": ME, "permissions": ["admin"]}]))
    _window(member, wall)
    notes.unlink()
    _window(member, wall)
    assert not member.paths.report_file().exists() and "may still apply the rules" in member.exposed
    (app_data / "syftperm.yaml").write_text("[]\n")
    os.utime(app_data / "syftperm.yaml", (os.stat(app_data).st_mtime + 5,) * 2)  # written after it was seen
    _window(member, wall)
    assert member.paths.report_file().exists()
    own = member.paths.report_dir() / "notes.syftperm.yaml"
    own.write_text("[]\n")
    _window(member, wall)
    own.unlink()
    for _ in range(2):
        _window(member, wall)
    assert member.paths.report_file().exists()
    assert b"# cpu_tracker: written again" in (member.paths.report_dir() / "syftperm.yaml").read_bytes()


@pytest.mark.parametrize("pattern, user, folder, readers", [
    ("**", "*", ("x",), {"*"}),
    ("public/**", "*", ("app_data", "cpu_tracker"), set()),
    ("app_data/*.json", "*", ("app_data", "cpu_tracker"), set()),  # files in app_data, not in its subfolders
    ("app_data/*/*.json", "*", ("app_data", "cpu_tracker"), {"*"}),
    ("APP_DATA/**", "*", ("app_data", "cpu_tracker"), {"*"}),  # case differs: counted (fail closed)
    ("app_data/cpu_tracker", "*", ("app_data", "cpu_tracker"), set()),  # the folder itself, no file in it
    ("{useremail}/**", "*", ("m@x.org",), {"m@x.org"}),  # an inbox folder named by its member: that member
    ("{useremail}/**", "*", ("cpu_tracker_inbox", "m@x.org"), set()),
    ("*/{useremail}/**", "*", ("cpu_tracker_inbox", "m@x.org"), {"m@x.org"}),
    ("**/{useremail}/**", "*", ("cpu_tracker_inbox", "m@x.org"), {"*"}),  # anywhere below: everyone
    ("{useremail}*/**", "*", ("m@x.org",), {"*"}),
    ("{useremail}/**", OTHER, ("m@x.org",), set()),
    ("{useremail}/**", OTHER, (OTHER,), {OTHER}),
    ("{a,b}/**", OTHER, ("c",), {OTHER}),  # braces: counted as matching (the Go server expands them)
])
def test_rule_readers(pattern, user, folder, readers) -> None:
    assert rule_readers(Rule(1, pattern, (user,), ("read",)), folder) == readers


@pytest.mark.parametrize("name, data, unknown", [
    ("syftperm.yaml", b"", "empty"),
    ("syftperm.yaml", b"# only this\n", "empty"),
    ("syftperm.yaml", b"- path: '**'\n  user: '*'\n  permissions: [2]\n", "not text"),  # 2 is READ to pydantic
    ("syftperm.yaml", b"- path: '**'\n  user: '*'\n  permissions: [read]\n  allow: false\n", "'allow'"),
    ("syftperm.yaml", b"- path: '**'\n  user: '*'\n  permissions: [read]\n  type: deny\n", "type 'deny'"),
    ("syftperm.yaml", b"- {path: '**', user: '*', permissions: [read]}\n---\n- {}\n", "not valid YAML"),
    ("syftperm.yaml", b"[" * 5000 + b"]" * 5000, ""),  # libyaml reads it (rule 1 is no mapping), PyYAML recurses
    ("syft.pub.yaml", b"terminal: yes please\n", "terminal"),
    ("syft.pub.yaml", b"rules:\n- pattern: '**'\n  access: {read: ['*']}\n  extra: 1\n", "rule 1"),
    ("syft.pub.yaml", b"rules:\n- pattern: '**'\n  access: {peek: ['*']}\n", "rule 1"),
])
def test_what_the_app_does_not_know_is_unknown(name, data, unknown) -> None:
    pf = parse_permission_file(name, data)
    assert pf.unknown is not None and unknown in pf.unknown, pf


# ---------------------------------------------------------------------------------------------------
# Verdicts kept across periods (the aggregator checks 10,000 inbox folders a tick): every change is caught next period
# ---------------------------------------------------------------------------------------------------
INBOX = ("app_data", "cpu_tracker_inbox")


def _inboxes(tmp_path: Path, n: int = 2) -> tuple[PermissionGuard, list[Path], list[str]]:
    """An aggregator's datasite with ``n`` inbox folders, each readable by its member, and a guard that found them
    safe; every stamp already older than the coarse ctime clock's tick."""
    datasite = tmp_path / "datasites" / AGG
    members = [f"m{i}@example.org" for i in range(n)]
    folders = [datasite.joinpath(*INBOX, m) for m in members]
    for folder, m in zip(folders, members):
        ensure_permissions(folder, AGG, [m])
    time.sleep(0.05)
    guard = PermissionGuard(datasite)
    assert [guard.exposure(f, [m]) for f, m in zip(folders, members)] == [None] * n
    return guard, folders, members


def _utime_back(path: Path, st: os.stat_result) -> None:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _rewrite(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    _utime_back(path, st)


def _stray(folder: Path) -> Path:
    st = (folder / SYFTPERM_FILE).stat()
    target = folder / "notes.syftperm.yaml"
    target.write_bytes((folder / SYFTPERM_FILE).read_bytes())  # the same safe rules, under a name the relay misreads
    _utime_back(target, st)
    return target


def _symlink(folder: Path) -> Path:
    target, copy = folder / SYFTPERM_FILE, folder.parent / "elsewhere.yaml"
    copy.write_bytes(target.read_bytes())  # the same safe rules, but through a link
    link = folder / ".link.tmp"
    link.symlink_to(copy)
    os.replace(link, target)
    return target


def _grant_above(folder: Path) -> Path:
    target = folder.parent / SYFTPERM_FILE
    target.write_text(GRANT)
    return target


def _pub_everyone(folder: Path) -> Path:
    target = folder / SYFT_PUB_FILE
    _rewrite(target, permission_files(AGG, ["*"])[SYFT_PUB_FILE])
    return target


def _grant_here(folder: Path) -> Path:
    target = folder / SYFTPERM_FILE
    _rewrite(target, GRANT.encode())  # another size, the old mtime
    return target


def _folder_replaced(folder: Path) -> Path:
    aside = folder.with_name(folder.name + ".old")
    folder.rename(aside)
    folder.mkdir()
    (folder / SYFTPERM_FILE).write_text(GRANT)
    return folder / SYFTPERM_FILE


CHANGES = {"rewritten with the old mtime": _grant_here, "a stray notes.syftperm.yaml": _stray,
           "replaced by a symlink": _symlink, "a grant in the folder above": _grant_above,
           "syft.pub.yaml granting everyone, old mtime": _pub_everyone, "the folder replaced": _folder_replaced}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_kept_verdict_catches_any_change_on_the_very_next_period(tmp_path, monkeypatch, change) -> None:
    """Trusting every stamp (RACY_NS 0): the verdict was kept, and the change is caught at the next period anyway."""
    monkeypatch.setattr(permissions, "RACY_NS", 0, raising=False)  # trust every stamp
    guard, folders, members = _inboxes(tmp_path)
    guard.refresh()
    assert guard.exposure(folders[0], members[:1]) is None
    target = CHANGES[change](folders[0])
    guard.refresh()
    problem = guard.exposure(folders[0], members[:1])
    assert problem is not None and str(target) in problem, problem


def _same_size_grant(path: Path) -> bytes:
    """The file's bytes with its reader turned into a pattern (``'*@example.or'``: everyone to the Go server), in
    exactly as many bytes."""
    data = path.read_bytes()
    reader = re.search(rb"user: (m\d@example\.org)", data).group(1)
    forged = b"'*" + reader[2:-1] + b"'"
    assert len(forged) == len(reader)
    return data.replace(reader, forged)


def _rewrite_in_place(path: Path, data: bytes) -> os.stat_result:
    """Overwrite ``path`` in place (the same inode) with ``data`` of the same size, then put mtime back: only ctime,
    which no user can set, tells the versions apart."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    _utime_back(path, before)
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    return after


def test_a_rewrite_in_place_with_mtime_and_size_kept_is_caught_by_ctime(tmp_path, monkeypatch) -> None:
    """The adversary keeps inode, size and mtime; the rewrite and the ``utime`` move ctime, which the stamp holds."""
    monkeypatch.setattr(permissions, "RACY_NS", 0, raising=False)  # trust every stamp
    guard, folders, members = _inboxes(tmp_path)
    target = folders[0] / SYFTPERM_FILE
    forged = _same_size_grant(target)
    time.sleep(0.05)  # more than one tick of the kernel's coarse clock since the stamp was taken
    _rewrite_in_place(target, forged)
    guard.refresh()
    problem = guard.exposure(folders[0], members[:1])
    assert problem is not None and str(target) in problem and "'*@example.or'" in problem, problem


def _coarse_clock(monkeypatch, folder: Path) -> None:
    """What a kernel before 6.13 (no multigrain timestamps) does within one tick of its coarse clock: every write
    stamps the same ctime. Simulated for the files under ``folder`` (this machine's kernel moves ctime at every
    write)."""
    real, frozen = os.lstat, time.time_ns()

    def lstat(path, *a, **k):
        st = real(path, *a, **k)
        if not os.fspath(path).startswith(str(folder)):
            return st
        extra = {name: getattr(st, name) for name in ("st_atime", "st_mtime", "st_ctime", "st_atime_ns",
                                                       "st_mtime_ns", "st_blksize", "st_blocks", "st_rdev")}
        return os.stat_result(tuple(st)[:10], extra | {"st_ctime_ns": frozen})

    monkeypatch.setattr(os, "lstat", lstat)


def test_a_rewrite_in_place_within_one_tick_of_the_ctime_clock_is_caught(tmp_path, monkeypatch) -> None:
    """Within one tick of a coarse ctime clock a rewrite that restores mtime and size keeps every stamp: a stamp that
    recent is not trusted (``RACY_NS``), so the file is read again at the next period."""
    datasite = tmp_path / "datasites" / AGG
    folder = datasite.joinpath(*INBOX, "m0@example.org")
    ensure_permissions(folder, AGG, ["m0@example.org"])
    _coarse_clock(monkeypatch, folder)
    target = folder / SYFTPERM_FILE
    forged = _same_size_grant(target)
    guard = PermissionGuard(datasite)
    assert guard.exposure(folder, ["m0@example.org"]) is None
    before = os.lstat(target)
    _rewrite_in_place(target, forged)
    assert os.lstat(target) == before  # every stamp as it was
    guard.refresh()
    assert str(target) in (guard.exposure(folder, ["m0@example.org"]) or "")


def test_an_unchanged_folder_costs_its_stamps_once_a_period_and_no_new_verdict(tmp_path, monkeypatch) -> None:
    """Two inboxes, each asked twice a period (the aggregator's check, then the inbox write): each folder on their
    paths is stamped once a period, no rule is judged again and no permission file is read again."""
    monkeypatch.setattr(permissions, "RACY_NS", 0, raising=False)  # trust every stamp
    guard, folders, members = _inboxes(tmp_path)
    judged, lstats, real_lstat = [], [], os.lstat
    monkeypatch.setattr(permissions, "exposure", lambda *a, **k: judged.append(a) or None)
    monkeypatch.setattr(permissions, "read_regular", lambda *a, **k: pytest.fail(f"{a[0]} read again"))
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: lstats.append(os.fspath(p)) or real_lstat(p, *a, **k))
    for _ in range(3):
        guard.refresh()
        lstats.clear()
        for _ in range(2):
            assert [guard.exposure(str(f), [m]) for f, m in zip(folders, members)] == [None, None]
        assert judged == []
        assert sorted(set(lstats)) == sorted(lstats)  # nothing stamped twice in a period
        on_the_way = {str(tmp_path / "datasites" / AGG)} | {str(folders[0].parents[i]) for i in range(2)}
        assert on_the_way | {str(f) for f in folders} <= set(lstats)
        assert {str(f / n) for f in folders for n in (SYFTPERM_FILE, SYFT_PUB_FILE)} <= set(lstats)


# ---------------------------------------------------------------------------------------------------
# The client's record of what the relay holds is trusted only when no other local user could have written it
# ---------------------------------------------------------------------------------------------------
def _inbox_with_record(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An aggregator's datasite with one safe inbox folder, and an empty client record (0644 in a 0755 folder)."""
    datasite = tmp_path / "datasites" / AGG
    folder = datasite.joinpath(*INBOX, "m@example.org")
    ensure_permissions(folder, AGG, ["m@example.org"])
    record = tmp_path / "plugins" / "local_syncstate.json"
    record.parent.mkdir(mode=0o755)
    record.write_text(json.dumps({"states": {}, "status_info": {}}))
    os.chmod(record, 0o644)
    return datasite, folder, record


@pytest.mark.parametrize("open_up", ["record", "plugins"])
def test_a_client_record_others_can_write_fails_closed_until_fixed(tmp_path, open_up) -> None:
    """A record another local user could forge could hide what the relay holds: while the record, or its folder, is
    writable by others every folder counts as exposed, with the command that fixes it; fixed, the check is as before."""
    datasite, folder, record = _inbox_with_record(tmp_path)
    guard = PermissionGuard(datasite, record)
    assert guard.exposure(folder, ["m@example.org"]) is None
    opened = record if open_up == "record" else record.parent
    os.chmod(opened, 0o666 if open_up == "record" else 0o777)
    guard.refresh()
    why = guard.exposure(folder, ["m@example.org"])
    assert why is not None and "record of what the relay holds" in why and f"chmod go-w {opened}" in why
    os.chmod(opened, 0o644 if open_up == "record" else 0o755)
    guard.refresh()
    assert guard.exposure(folder, ["m@example.org"]) is None


def test_a_client_record_others_can_write_vouches_for_no_delivery(tmp_path) -> None:
    """Whatever a record another local user could have written says, no upload counts as delivered by it (so the
    member charges nothing on its word), whichever is asked first: the exposure check or the delivery."""
    datasite, folder, record = _inbox_with_record(tmp_path)
    upload = folder / "r7.json"
    upload.write_bytes(b"an upload")
    digest = hashlib.sha256(b"an upload").hexdigest()
    key = f"{AGG}/{'/'.join(INBOX)}/m@example.org/r7.json"
    record.write_text(json.dumps({"states": {key: {"hash": digest}}, "status_info": {}}))
    guard = PermissionGuard(datasite, record, watch=lambda name: name == "r7.json")
    assert guard.delivered(upload) is True
    os.chmod(record, 0o666)
    guard.refresh()
    assert guard.delivered(upload) is False and guard.needs_reset(folder) is False
    assert guard.exposure(folder, ["m@example.org"]) is not None
    os.chmod(record, 0o644)
    guard.refresh()
    assert guard.delivered(upload) is True and guard.exposure(folder, ["m@example.org"]) is None


def test_a_client_record_owned_by_another_user_fails_closed(tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root; this case was not run")
    datasite, folder, record = _inbox_with_record(tmp_path)
    os.chown(record, 54321, 54321)
    why = PermissionGuard(datasite, record).exposure(folder, ["m@example.org"])
    assert why is not None and "belongs to uid 54321" in why


def test_a_user_file_named_like_an_upload_with_other_digits_is_no_upload(tmp_path) -> None:
    """``str.isdigit`` takes "²": a user's file `r².json` anywhere in the datasite must not stop the member."""
    assert Paths.upload_round("r12.json") == 12 and Paths.upload_round("r².json") is None
    raw = json.dumps({"states": {f"{AGG}/photos/r².json": {"hash": "x"}}, "status_info": {}}).encode()
    assert parse_sync_state(raw, AGG, lambda name: Paths.upload_round(name) is not None) == {}


def test_verdicts_nobody_asks_for_are_forgotten(tmp_path) -> None:
    """Each cohort keys its own verdict on the epoch folder: an old cohort's is dropped, not kept for ever."""
    datasite = tmp_path / "datasites" / AGG
    folder = datasite.joinpath(*INBOX, "epoch")
    ensure_permissions(folder, AGG, ["m@example.org"])
    guard = PermissionGuard(datasite)
    for cohort in range(50):
        guard.exposure(folder, [f"m{cohort}@example.org"])
        guard.refresh()
    for _ in range(2 * permissions.FORGET_EVERY):
        guard.exposure(folder, ["m49@example.org"])
        guard.refresh()
    assert len(guard._verdicts) == len(guard._judged) == 1
