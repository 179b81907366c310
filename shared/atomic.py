"""Atomic file writes: readers (SyftBox's uploader, other apps) see the old file or the new one, never a mix.

Pattern from prometheus_client's ``write_to_textfile``: temp file in the same folder, flush + fsync, then
``os.replace``; the temp file is removed if anything fails.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable

TEMP_SUFFIX = ".tmp"  # SyftBox's default _.syftignore excludes *.tmp: a half-written temp file is never uploaded
PUBLIC = 0o644  # files others read (reports, dashboard, permission files): SyftBox and other apps read them
PRIVATE = 0o600  # the owner's own files (ledger, raw values, per-member status, history, keys)
PRIVATE_DIR = 0o700  # folders holding private files


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True, mode: int = PUBLIC) -> None:
    """Replace ``path`` with ``data`` atomically. Creates the parent folder. ``durable`` also fsyncs the folder."""
    atomic_write_chunks(path, [data], durable=durable, mode=mode)


def atomic_write_chunks(
    path: Path, chunks: Iterable[bytes], *, durable: bool = True, fsync: bool = True, mode: int = PUBLIC
) -> None:
    """Replace ``path`` with the concatenated ``chunks`` atomically, without holding the whole content.
    ``fsync`` flushes the file to disk before the rename; ``durable`` also fsyncs the folder after it. Leave
    both off only for derived state that the next write recreates anyway.

    The file gets exactly ``mode`` whatever the umask (``PUBLIC`` 0644 by default, ``PRIVATE`` 0600 for the
    owner's own files, whose missing folders are then created 0700): the temp file is created 0600 by
    ``mkstemp`` and chmodded before the rename, so a private file is never readable by others, not even
    for a moment."""
    path = Path(path)
    try:
        if mode & 0o077 == 0:
            ensure_private_dir(path.parent)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise _about(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(chunks)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _about(e, path) from e
        raise
    if durable:
        _fsync_dir(path.parent)


def replace_file(path: Path | str, data: bytes, *, mode: int = PUBLIC) -> None:
    """Replace ``path`` (its folder exists; one writer per file) with ``data`` atomically but not durably: written to
    a temp file, then renamed over it, so a reader of ``path`` sees the old file or the new one, whole. For derived
    files rewritten at a high rate and again at the next change anyway (secure mode's inboxes, thousands a round).
    Creating a file costs about 250 us on this kind of machine, five times the rest of a write, so the inode that
    ``path`` held is kept (hard-linked aside before the rename) as the temp file of the next write; a temp file that
    is not a regular file of ours with one link (planted, or linked elsewhere) is replaced by a new one. Temp names
    end in ``TEMP_SUFFIX``: never synced."""
    path = os.fspath(path)
    head, tail = os.path.split(path)
    nxt = os.path.join(head, f".{tail}.next{TEMP_SUFFIX}")
    kept = os.path.join(head, f".{tail}.kept{TEMP_SUFFIX}")
    fd = _reusable(nxt, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))  # after the write: an inbox's size barely changes, so no block is freed
    finally:
        os.close(fd)
    try:
        os.link(path, kept, follow_symlinks=False)
    except FileExistsError:
        os.unlink(kept)
        os.link(path, kept, follow_symlinks=False)
    except FileNotFoundError:
        kept = None
    os.replace(nxt, path)
    if kept is not None:
        os.replace(kept, nxt)


def _reusable(tmp: str, mode: int) -> int:
    """A descriptor of ``tmp`` opened for writing: the kept inode when it is a regular file of ours with one link,
    else a new file (created exclusively, never through a symlink)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.getuid() and (st.st_mode & 0o7777) == mode:
            return fd
        os.close(fd)
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError:  # a symlink, a folder, a FIFO: not ours to write through
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, mode)
    os.fchmod(fd, mode)  # the umask filtered the mode given to open
    return fd


def ensure_private_dir(folder: Path) -> None:
    """Create ``folder`` and its missing parents mode 0700 whatever the umask, and tighten ``folder`` itself
    to 0700 if it already exists, is ours and is open to others."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not os.path.lexists(probe) and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    for created in reversed(missing):
        try:
            os.mkdir(created, PRIVATE_DIR)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(created, PRIVATE_DIR)  # mkdir's mode is filtered by the umask
    if not missing:
        st = os.stat(folder)  # raises for a missing folder behind a dangling link, as mkdir would
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(folder, PRIVATE_DIR)


def _about(e: OSError, path: Path) -> OSError:
    """``e`` naming the target file, not the random temp name: the same fault gives the same message (so it is
    logged once), and the message names the file the user knows. Keeps the subclass (PermissionError, ...)."""
    return OSError(e.errno, e.strerror or str(e), str(path)) if e.errno else e


def remove_stale_temps(folder: Path) -> list[str]:
    """Delete the temp files ``atomic_write_bytes`` leaves behind when the process is killed mid-write. Call it
    only while no other process writes into ``folder`` (the app holds its instance lock). Returns their names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


def atomic_write_text(path: Path, text: str, **kw: Any) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8 (same keywords: ``durable``, ``mode``)."""
    atomic_write_bytes(path, text.encode("utf-8"), **kw)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2, **kw: Any) -> None:
    """Write ``obj`` as strict JSON (NaN/Infinity refused) atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n", **kw)


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly it (avoids needless re-uploads).

    Returns True when the file was (re)written."""
    try:
        if read_regular(path, len(data) + 1) == data:
            return False
    except OSError:  # missing, or not a regular file (a FIFO, a folder, a symlink): replaced by the atomic write
        pass
    atomic_write_bytes(path, data)
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class NotRegularFile(OSError):
    """What is at the path is not a regular file (a FIFO, socket, device, folder, or a symlink not followed)."""


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def describe(mode: int) -> str:
    """What a file of ``st_mode`` is, in words ("a FIFO", "a folder", ...)."""
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "not a regular file"


def read_regular(path: Path, limit: int, *, follow: bool = False) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``, without ever blocking: for any file another process,
    app or user may create. Raises ``FileNotFoundError`` when nothing is there, ``NotRegularFile`` for a FIFO, a
    socket, a device or a folder (and for a symlink unless ``follow``), ``OSError`` when it cannot be read.

    The path is checked with ``stat`` before it is opened (a device is never opened at all), opened with
    ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block the open) and ``O_NOFOLLOW`` unless ``follow``, and
    the decision is taken again on ``fstat`` of what was opened."""
    st = os.stat(path, follow_symlinks=follow)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(errno.EINVAL, f"is {describe(st.st_mode)}, not a regular file", str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:  # swapped for a symlink since the stat
            raise NotRegularFile(errno.ELOOP, "is a symbolic link, not a regular file", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"is {describe(st.st_mode)}, not a regular file", str(path))
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_capped(path: Path, limit: int = 1 << 20, *, follow: bool = False) -> bytes | None:
    """The first ``limit`` bytes of a file another process writes atomically; None when it is missing, is not a
    regular file (``read_regular``: never blocks on a FIFO, never follows a symlink unless ``follow``) or cannot be
    read (the caller treats all of these as "not there yet")."""
    try:
        return read_regular(path, limit, follow=follow)
    except OSError:
        return None
