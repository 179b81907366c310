"""Atomic file writes: readers (SyftBox's uploader, other apps) see the old file or the new one, never a mix.

Pattern from prometheus_client's ``write_to_textfile``: temp file in the same folder, flush + fsync, then
``os.replace``; the temp file is removed if anything fails.
"""

from __future__ import annotations

import json
import os
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
        if Path(path).read_bytes() == data:
            return False
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
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


def read_capped(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The first ``limit`` bytes of a file another process writes atomically; None when it is missing or cannot be
    read (the caller treats both as "not there yet")."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None
