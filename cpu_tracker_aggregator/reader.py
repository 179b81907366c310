"""Opening a member's report without following a symlink anywhere on the way, and without ever blocking.

The walk is CPython's ``shutil._rmtree_safe_fd``: from the datasites folder, one component at a time, each folder
opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's descriptor, the file itself with ``O_NOFOLLOW |
O_NONBLOCK``, and the decision taken on ``os.fstat`` of what was opened (a regular file, not above the size cap).
No path is resolved again after a check, so a symlink swapped in mid-walk is refused too. A symlink anywhere (the
member's folder, ``app_data``, the app's folder, the file) is refused as ``symlink``; a FIFO or socket, a folder
where the file should be, as ``not_a_file``. A path that leads nowhere is no report at all (``None``).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

from cpu_tracker_aggregator.validate import Rejected
from shared.atomic import stat_signature

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | _CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC


class Read(NamedTuple):
    """What was found at a report path: its bytes or why it cannot be read, and the stat signature
    (inode, size, mtime_ns) of the path as ``os.lstat`` sees it (None: not known, so it is read again next tick)."""

    data: bytes | Rejected
    sig: tuple[int, int, int] | None


signature = stat_signature  # for cpu_tracker_aggregator/secure.py until secure-v2 imports shared.atomic's (issue 20)


def open_datasites(path: str) -> int:
    """A descriptor of the datasites folder, the start of every walk (-1 if it cannot be opened)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError:
        return -1


def read_report(ds_fd: int, ds: str, parts: tuple[str, ...], max_bytes: int) -> Read | None:
    """The file at ``ds/parts[0]/.../parts[-1]``, opened by a walk from ``ds_fd`` (the descriptor of ``ds``); None
    when nothing is there."""
    fds: list[int] = []
    try:
        parent = ds_fd
        for name in parts[:-1]:
            try:
                parent = os.open(name, DIR_FLAGS, dir_fd=parent)
            except OSError as e:
                return _refused_folder(e, name, parent, ds, parts)
            fds.append(parent)
        try:
            fd = os.open(parts[-1], FILE_FLAGS, dir_fd=parent)
        except OSError as e:
            return _refused_file(e, parts[-1], parent)
    finally:
        for d in fds:
            os.close(d)
    try:
        st = os.fstat(fd)
        sig = stat_signature(st)
        if not stat.S_ISREG(st.st_mode):
            return Read(Rejected("not_a_file"), sig)
        if st.st_size > max_bytes:
            return Read(Rejected("too_large", f"{st.st_size} bytes > {max_bytes}"), sig)
        data = os.read(fd, st.st_size + 1)  # all of it: a regular file reads short only at its end
        while len(data) > st.st_size and len(data) <= max_bytes:  # it grew since fstat
            more = os.read(fd, max_bytes + 1 - len(data))
            if not more:
                break
            data += more
        return Read(data, sig)
    except OSError as e:
        return Read(Rejected("unreadable", e.strerror or str(e)), None)
    finally:
        os.close(fd)


def _refused_entry(error: OSError, name: str, parent: int) -> os.stat_result | None:
    """What refused to open (not following a symlink), or None when nothing is there."""
    if error.errno == errno.ENOENT:
        return None
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return None


def _refused_folder(error: OSError, name: str, parent: int, ds: str, parts: tuple[str, ...]) -> Read | None:
    """A folder on the way did not open: nothing there, a file where a folder should be, or a symlink (refused if
    the path leads to a file through it: that file is not the member's own)."""
    st = _refused_entry(error, name, parent)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.lstat(os.path.join(ds, *parts))
        except OSError:
            return None  # leads nowhere: no report here
        return Read(Rejected("symlink", f"{name!r} on the way to the report is a symlink"), stat_signature(target))
    if not stat.S_ISDIR(st.st_mode):
        return None  # a file where a folder should be: no report here
    return Read(Rejected("unreadable", f"{name}: {error.strerror or error}"), None)


def _refused_file(error: OSError, name: str, parent: int) -> Read | None:
    st = _refused_entry(error, name, parent)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return Read(Rejected("symlink", "the report file is a symlink"), stat_signature(st))
    if not stat.S_ISREG(st.st_mode):
        return Read(Rejected("not_a_file"), stat_signature(st))  # a socket cannot be opened at all
    return Read(Rejected("unreadable", error.strerror or str(error)), None)
