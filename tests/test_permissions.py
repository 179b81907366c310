"""Permissions that fail closed, in the member's own workspace (no relay record: the fallback the Go client gets):
withdrawal removes every file the member published and says so once; a permission file that is not a regular file,
an odd name, a ``{useremail}`` rule; what each kind of rule lets whom read (``rule_readers``)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import yaml

from cpu_tracker_member.member import Member, run_member
from shared.logs import Problems
from shared.paths import Paths
from shared.permissions import Rule, parse_permission_file, rule_readers
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
