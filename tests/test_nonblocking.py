"""Never block, never follow: every read of a file that someone else may create goes through
``shared.atomic.read_regular`` / ``read_capped``, which refuse FIFOs, sockets, devices, folders and (unless told to
follow) symlinks, and never block on a FIFO. Each test runs under a deadline, so a regression fails instead of
hanging the suite."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from cpu_tracker_member.member import Member, run_member
from shared.atomic import NotRegularFile, read_capped, read_regular, write_if_changed
from shared.logs import Problems
from shared.paths import Paths
from shared.settings import SettingsError, load_settings, Settings
from tests.conftest import AGG, FakeClock, FakeWall
from tests.special_files import deadline, make_fifo, make_socket

ME = "me@example.org"


def _symlink(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "target").write_bytes(b"hello")
    path.symlink_to(path.parent / "target")
    return path


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _device(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/zero")
    return path


KINDS = {"fifo": make_fifo, "socket": make_socket, "symlink": _symlink, "folder": _folder, "device_link": _device}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_read_regular_refuses_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = KINDS[kind](tmp_path / "f")
    with deadline(5):
        with pytest.raises(NotRegularFile):
            read_regular(path, 100)
        assert read_capped(path) is None
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 100)


def test_read_regular_follows_a_symlink_only_when_asked_and_still_refuses_a_device(tmp_path: Path) -> None:
    link = _symlink(tmp_path / "link")
    assert read_regular(link, 100, follow=True) == b"hello"
    dev = _device(tmp_path / "dev")
    with deadline(5), pytest.raises(NotRegularFile):
        read_regular(dev, 100, follow=True)


def test_read_regular_reads_at_most_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 3_000_000)
    assert len(read_regular(path, 2_500_001)) == 2_500_001 and read_regular(path, 10) == b"x" * 10


def test_read_regular_reads_whole_a_file_that_grew_after_its_fstat_and_an_empty_one(tmp_path: Path, monkeypatch) -> None:
    """One read of the size fstat gave, plus one byte, is taken for the whole file only when it comes back short."""
    import shared.atomic as atomic

    path = tmp_path / "f"
    path.write_bytes(b"")
    assert read_regular(path, 100) == b""
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat

    def fstat_then_grow(fd):
        st = real_fstat(fd)
        with open(path, "ab") as f:
            f.write(b"y" * 3_000_000)
        return st

    monkeypatch.setattr(atomic.os, "fstat", fstat_then_grow)
    assert read_regular(path, 4_000_000) == b"x" * 10 + b"y" * 3_000_000


def test_a_fifo_swapped_in_after_the_callers_own_stat_cannot_block_the_open(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    st = os.lstat(path)
    path.unlink()
    os.mkfifo(path)
    with deadline(5), pytest.raises(NotRegularFile):
        read_regular(path, 100, st=st)


def test_a_fifo_swapped_in_after_the_check_cannot_block_the_open(tmp_path: Path, monkeypatch) -> None:
    """The stat sees a file, then a FIFO takes its place before the open: O_NONBLOCK and fstat still refuse it."""
    import shared.atomic as atomic

    path = tmp_path / "f"
    path.write_bytes(b"x")
    real_stat, swapped = os.stat, []

    def stat_then_swap(p, *a, **kw):
        st = real_stat(p, *a, **kw)
        if Path(p) == path and not swapped:
            swapped.append(True)
            path.unlink()
            os.mkfifo(path)
        return st

    monkeypatch.setattr(atomic.os, "stat", stat_then_swap)
    with deadline(5), pytest.raises(NotRegularFile):
        read_regular(path, 100)


def test_write_if_changed_replaces_a_fifo_instead_of_blocking_on_it(tmp_path: Path) -> None:
    path = make_fifo(tmp_path / "syftperm.yaml")
    with deadline(5):
        assert write_if_changed(path, b"rules\n") is True
    assert path.read_bytes() == b"rules\n"


@pytest.mark.parametrize("kind", ["fifo", "socket", "folder", "device_link"])
def test_a_settings_file_that_is_not_a_file_is_one_sentence(tmp_path: Path, kind: str) -> None:
    KINDS[kind](tmp_path / "cpu_tracker.toml")
    with deadline(5), pytest.raises(SettingsError, match=r"cannot read .*cpu_tracker\.toml: .*not a regular file"):
        load_settings(tmp_path, {"CPU_TRACKER_AGGREGATOR": AGG})


def test_a_members_file_that_is_a_fifo_is_refused_in_a_sentence(tmp_path: Path) -> None:
    fifo = make_fifo(tmp_path / "members.txt")
    with deadline(5), pytest.raises(SettingsError, match="members_file .* cannot be read .*not a regular file"):
        load_settings(tmp_path, {"CPU_TRACKER_AGGREGATOR": AGG, "CPU_TRACKER_MEMBERS_FILE": str(fifo)})


FIFO_PLACES = {
    "root syftperm.yaml": lambda p: p.my_datasite / "syftperm.yaml",
    "app_data syftperm.yaml": lambda p: p.my_datasite / "app_data" / "syftperm.yaml",
    "report folder syftperm.yaml": lambda p: p.report_dir() / "syftperm.yaml",
    "report folder syft.pub.yaml": lambda p: p.report_dir() / "syft.pub.yaml",
    "aggregator's monitors.json": lambda p: p.monitors_file(AGG),
}


@pytest.mark.parametrize("place", sorted(FIFO_PLACES))
def test_a_fifo_anywhere_the_member_reads_never_hangs_it(tmp_path: Path, place: str) -> None:
    """A FIFO named like a file the member reads (a permission file, the aggregator's files): one window runs to
    its end under a deadline, whatever it then decides to publish."""
    paths = Paths(tmp_path, ME)
    make_fifo(FIFO_PLACES[place](paths))
    member = Member(paths, Settings(aggregator=AGG, interval_s=1), Problems(logging.getLogger("test.fifo")))
    reads = iter([0.0] + [5.0] * 10)
    with deadline(20):
        run_member(member, threading.Event(), read=lambda: next(reads), wall=FakeWall(), clock=FakeClock(1.0),
                   once=True)


def test_a_fifo_as_my_safe_zone_file_is_refused_at_once(tmp_path: Path) -> None:
    from cpu_tracker_member.monitor import MemberMonitors

    paths = Paths(tmp_path, ME)
    make_fifo(paths.zones_file(ME, AGG))
    member = Member(paths, Settings(aggregator=AGG, interval_s=1), Problems(logging.getLogger("test.fifo")))
    with deadline(5):
        zones, why = MemberMonitors(member)._zones()
    assert zones == {} and "not a regular file" in why
