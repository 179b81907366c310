"""Atomic file writes: readers (SyftBox's uploader, other apps) see the old file or the new one, never a mix.

Pattern from prometheus_client's ``write_to_textfile``: temp file in the same folder, flush + fsync, then
``os.replace``; the temp file is removed if anything fails.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from functools import lru_cache
from pathlib import Path
from collections.abc import Iterable  # not typing: the supervisor imports this module

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
        import tempfile  # here: the supervisor imports this module, and tempfile brings shutil and random (1.5 MB)

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
    end in ``TEMP_SUFFIX``: never synced. On Linux the new file and the old one swap names in one atomic step
    (``renameat2`` with ``RENAME_EXCHANGE``: a third of the cost of the link and two renames it replaces). A folder at
    ``path`` is left where it is: IsADirectoryError, as a rename over it would raise."""
    path = os.fspath(path)
    head, tail = os.path.split(path)
    nxt = os.path.join(head, f".{tail}.next{TEMP_SUFFIX}")
    kept = os.path.join(head, f".{tail}.kept{TEMP_SUFFIX}")
    fd, size = _reusable(nxt, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if size > len(data):  # after the write: an inbox's size barely changes, so no block is freed
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    if _exchange(nxt, path):
        if stat.S_ISDIR(os.lstat(nxt).st_mode):  # a folder stood at ``path``: it goes back there, never moved aside
            _exchange(nxt, path)
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        return
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


_renameat2 = None  # libc's renameat2 once looked up; False where there is none


def _exchange(a: str, b: str) -> bool:
    """Swap what ``a`` and ``b`` name, atomically (Linux's ``renameat2(..., RENAME_EXCHANGE)``, through ctypes: the
    standard library has no binding); False when ``b`` does not exist or the system or file system cannot."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            import ctypes  # here: the supervisor imports this module

            call = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
            if call is not None:
                call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                _renameat2 = (call, ctypes.get_errno)
    if not _renameat2:
        return False
    call, get_errno = _renameat2
    old, new = os.fsencode(a), os.fsencode(b)
    if b"\0" in old or b"\0" in new:  # C would cut the path there
        raise ValueError("embedded null byte")
    if call(_AT_FDCWD, old, _AT_FDCWD, new, _RENAME_EXCHANGE) == 0:
        return True
    err = get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not on this kernel or file system: never again
        _renameat2 = False
    elif err != errno.ENOENT:
        raise OSError(err, os.strerror(err), b)
    return False


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # linux/fcntl.h, linux/fs.h


def _reusable(tmp: str, mode: int) -> tuple[int, int]:
    """A descriptor of ``tmp`` opened for writing, and the size of what it holds: the kept inode when it is a regular
    file of ours with one link, else a new file (created exclusively, never through a symlink)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.getuid() and (st.st_mode & 0o7777) == mode:
            return fd, st.st_size
        os.close(fd)
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError:  # a symlink, a folder, a FIFO: not ours to write through
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, mode)
    os.fchmod(fd, mode)  # the umask filtered the mode given to open
    return fd, 0


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


class PrivateTreeError(OSError):
    """A private folder another local user could change (its owner, its mode, or a folder above it)."""

    def __str__(self) -> str:
        return f"{self.filename} {self.strerror}"


def secure_private_tree(root: Path, app_dir: Path) -> None:
    """Make the private tree safe from other local users, or raise ``PrivateTreeError`` saying what to change.

    ``root`` is ``<data_dir>/private``, ``app_dir`` the app's folder in it. Whatever the umask the files were made
    under: ``root`` and every folder from there down to and inside ``app_dir`` must be real folders (not symlinks)
    owned by this user, and are made 0700; no file or folder inside ``app_dir`` may belong to another user or be a
    symlink, and none stays writable by others (files keep their read bits: a 0700 folder already hides them). Above
    ``root``, no folder may let another user rename what it holds (writable by others without the sticky bit, or
    sticky while holding the next folder under another user's name): whoever can rename ``root`` away can make the
    app forget its privacy ledger. Missing folders are created 0700."""
    root, app_dir = Path(root), Path(app_dir)
    _check_above(root)
    ensure_private_dir(app_dir)
    here = root
    for part in ("", *app_dir.relative_to(root).parts):
        here = here / part if part else here
        _own_dir(here)
    for dirpath, dirnames, filenames in os.walk(app_dir):  # does not follow symlinked folders: refused below
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            try:
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    _own_dir(path)
                elif st.st_uid != os.geteuid() or stat.S_ISLNK(st.st_mode):
                    what = "a symlink" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}"
                    raise PrivateTreeError(errno.EPERM, f"is {what} inside the app's private folder, so another user "
                                           "may have put it there: remove it", str(path))
                elif st.st_mode & 0o022:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022, follow_symlinks=False)
            except FileNotFoundError:  # gone since the listing (a temp file another role just renamed): no threat
                continue


def _own_dir(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateTreeError(errno.ENOTDIR, f"is {describe(st.st_mode)}, not a folder: remove it so that the app "
                               "can make a private folder there", str(path))
    if st.st_uid != os.geteuid():
        raise PrivateTreeError(errno.EPERM, f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}), who "
                               "could change what it holds: remove it (the app makes it again, mode 0700)", str(path))
    if st.st_mode & 0o077:
        os.chmod(path, PRIVATE_DIR)


def check_trusted_file(path: Path) -> None:
    """Raise ``PrivateTreeError`` when another local user could have written the file at ``path`` (another app's
    file this one trusts): it, or the folder it is in, belongs to someone but this user or root, or can be written by
    others; or a folder above lets another user rename what it holds. Nothing there: nothing to distrust."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_uid not in (0, os.geteuid()):
        raise PrivateTreeError(errno.EPERM, f"belongs to uid {st.st_uid}, who could write anything in it: remove it "
                               "(the SyftBox client makes it again)", str(path))
    if others_can_write(path, st):
        raise PrivateTreeError(errno.EPERM, f"can be written by other users (mode {stat.S_IMODE(st.st_mode):04o}): run "
                               f"`chmod go-w {path}`", str(path))
    _check_above(Path(path), "replace it with a forged one")


def _check_above(root: Path, harm: str = "make the app forget the privacy budget it spent") -> None:
    """No folder from ``root``'s parent up to ``/`` lets another user rename the entry on the way to ``root`` (and so
    do ``harm``)."""
    for start in {Path(os.path.abspath(root)), Path(os.path.realpath(root))}:  # the path as named, and as it is
        _check_chain(start, harm)


def _check_chain(child: Path, harm: str) -> None:
    for folder in child.parents:
        try:
            st = os.stat(folder)
        except FileNotFoundError:  # made later, 0700, by ensure_private_dir
            child = folder
            continue
        try:
            child_uid = os.lstat(child).st_uid
        except FileNotFoundError:
            child_uid = os.geteuid()  # made by this process, next
        ours = {0, os.geteuid()}
        if others_can_write(folder, st) and not (st.st_mode & stat.S_ISVTX and child_uid in ours):
            raise PrivateTreeError(
                errno.EPERM, f"can be written by other users (mode {stat.S_IMODE(st.st_mode):04o}), who could then "
                f"rename {child} and {harm}; run `chmod go-w {folder}`",
                str(folder))
        if st.st_uid not in ours:
            raise PrivateTreeError(errno.EPERM, f"belongs to uid {st.st_uid}, who could rename {child}; keep the "
                                   "SyftBox folder under folders owned by you or root", str(folder))
        child = folder


def others_can_write(path: Path | str, st: os.stat_result) -> bool:
    """Whether a user but this one (or root) can write the file or folder at ``path`` (``st``: its stat): everyone
    can, or a group someone else is in can. A group only this user is in (the "user private group" Debian and Ubuntu
    give each user, whose umask 002 makes folders 0775) is this user's own, unless the file has an access ACL (its
    group bits are then the ACL's mask: a named user may write)."""
    if st.st_mode & 0o002:
        return True
    return bool(st.st_mode & 0o020) and (not _own_group(st.st_gid) or _has_acl(path))


def _has_acl(path: Path | str) -> bool:
    try:
        return "system.posix_acl_access" in os.listxattr(path)
    except OSError as e:
        return e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP)  # no extended attributes: no ACL; else unknown


@lru_cache(maxsize=16)
def _own_group(gid: int) -> bool:
    """Only this user is in group ``gid``: no one else lists it, and it is no one else's primary group."""
    import grp  # here: the supervisor imports this module
    import pwd

    me = os.geteuid()
    try:
        members, name = set(grp.getgrgid(gid).gr_mem), pwd.getpwuid(me).pw_name
    except KeyError:
        return False
    return not (members - {name}) and all(p.pw_uid == me for p in pwd.getpwall() if p.pw_gid == gid)


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


def atomic_write_text(path: Path, text: str, **kw: object) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8 (same keywords: ``durable``, ``mode``)."""
    atomic_write_bytes(path, text.encode("utf-8"), **kw)


def atomic_write_json(path: Path, obj: object, *, indent: int | None = 2, **kw: object) -> None:
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

    def __str__(self) -> str:
        return f"{self.filename} {self.strerror}"


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def describe(mode: int) -> str:
    """What a file of ``st_mode`` is, in words ("a FIFO", "a folder", ...)."""
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "not a regular file"


def read_regular(path: Path, limit: int, *, follow: bool = False, st: os.stat_result | None = None) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``, without ever blocking: for any file another process,
    app or user may create. Raises ``FileNotFoundError`` when nothing is there, ``NotRegularFile`` for a FIFO, a
    socket, a device or a folder (and for a symlink unless ``follow``), ``OSError`` when it cannot be read.

    The path is checked with ``stat`` before it is opened (a device is never opened at all; ``st``: the caller's own
    ``stat`` of ``path``, just taken, following symlinks as ``follow`` says), opened with ``O_NONBLOCK`` (a FIFO
    swapped in meanwhile cannot block the open) and ``O_NOFOLLOW`` unless ``follow``, and the decision is taken again
    on ``fstat`` of what was opened."""
    if st is None:
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
        chunks, left, want = [], limit, st.st_size + 1
        while left > 0:
            ask = min(left, want)
            chunk = os.read(fd, ask)
            chunks.append(chunk)
            left -= len(chunk)
            if len(chunk) < ask:  # a regular file's read comes back short only at its end: one read, as a rule
                break
            want = 1 << 20
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
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


# ---------------------------------------------------------------------------------------------------
# Reading again only what changed
# ---------------------------------------------------------------------------------------------------
def stat_signature(st: os.stat_result) -> tuple[int, int, int]:
    """What tells a file's versions apart without reading it: inode (a replacement), size and modification time."""
    return st.st_ino, st.st_size, st.st_mtime_ns


class ChangeCache:
    """What was made of each file (parsed, validated), kept with the stat signature of the version it was made from,
    so that an unchanged file costs one ``stat`` and a changed or replaced one is made again. ``follow_symlinks``
    False: ``lstat`` (a symlink is judged as itself)."""

    def __init__(self, *, follow_symlinks: bool = True):
        self.follow_symlinks = follow_symlinks
        self._kept: dict[object, tuple[tuple[int, int, int], object]] = {}

    def signature(self, key: object, path: str | os.PathLike) -> tuple[int, int, int] | None:
        """The file's signature now; None, and what was kept for ``key`` forgotten, when it cannot be stat'ed."""
        try:
            return stat_signature(os.stat(path, follow_symlinks=self.follow_symlinks))
        except OSError:
            self._kept.pop(key, None)
            return None

    def unchanged(self, key: object, sig: tuple[int, int, int]) -> bool:
        """Whether what is kept for ``key`` was made from the version with signature ``sig``."""
        kept = self._kept.get(key)
        return kept is not None and kept[0] == sig

    def value(self, key: object):
        """What was last kept for ``key`` (whatever its version), or None."""
        kept = self._kept.get(key)
        return None if kept is None else kept[1]

    def keep(self, key: object, sig: tuple[int, int, int], value: object = None) -> None:
        self._kept[key] = (sig, value)
