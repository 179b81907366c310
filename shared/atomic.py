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


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically. Creates the parent folder. ``durable`` also fsyncs the folder."""
    atomic_write_chunks(path, [data], durable=durable)


def atomic_write_chunks(path: Path, chunks: Iterable[bytes], *, durable: bool = True, fsync: bool = True) -> None:
    """Replace ``path`` with the concatenated ``chunks`` atomically, without holding the whole content.
    ``fsync`` flushes the file to disk before the rename; ``durable`` also fsyncs the folder after it. Leave
    both off only for derived state that the next write recreates anyway."""
    path = Path(path)
    try:
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
        os.chmod(tmp, 0o644)
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
