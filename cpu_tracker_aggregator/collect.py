"""Finding and checking every member's report, re-reading only what changed since the last tick.

A file is re-parsed only when its (inode, size, mtime) changes; otherwise its cached summary is reused and
only its freshness, which depends on the time, is re-evaluated. The cache keeps a compact summary per
member, never the parsed report: its numbers in numpy columns (one slot per member), its stat signature and
its line of the private ``members.json``. A warm tick therefore costs one ``stat`` per member plus a few
vector operations, and 100,000 members take a few tens of MB.

Freshness is judged on the aggregator's own clock, so a member whose clock is off by minutes is neither
dropped nor kept forever: a report is fresh while the aggregator first saw its current content less
than ``stale_after_s`` ago, provided the report's own time is no further than ``future_tolerance_s +
stale_after_s`` in the past (an old file found at start-up is not fresh). Each file is handled in its own
``try``: one bad file never stops a tick.

A new or changed file is opened first (``O_NOFOLLOW | O_NONBLOCK``: a symlinked file or a FIFO can neither
fool nor block the aggregator) and checked through its descriptor (``fstat``: type, size, signature). On
Linux it is opened with ``openat2(RESOLVE_NO_SYMLINKS)`` below the datasites folder, so a success proves that
no symlink on the way leads out of the member's folder; a refusal, or another system, falls back to asking
the kernel which path it opened (``/proc/self/fd``) and, failing that, to resolving the path.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import stat
import sys
from array import array
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from cpu_tracker_aggregator.validate import Accepted, Rejected, check_member_name, parse_report
from shared.paths import REPORT_FILE
from shared.settings import Settings

Status = Literal["fresh", "stale", "legacy", "rejected"]
STATUSES: tuple[Status, ...] = ("fresh", "stale", "legacy", "rejected")
FRESH, STALE, LEGACY, REJECTED = range(4)
FREE = -1  # a slot no member uses
REPORT, LEGACY_REPORT, REJECTED_FILE = 0, 1, 2  # what a slot's file is (its status follows, with the time)

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
_json_str = json.encoder.encode_basestring_ascii  # a JSON string literal, in C
_FLOATS = ("value", "scale", "epsilon", "unit_s", "window_s")


def _us(t: datetime) -> int:
    """Exact microseconds since the epoch (so freshness compares exactly as timedelta arithmetic does)."""
    return (t - _EPOCH) // _US


@dataclass(frozen=True)
class FreshReleases:
    """The fresh members' releases, column-wise (one entry per fresh member)."""

    values: np.ndarray
    noise_scales: np.ndarray
    epsilons: np.ndarray
    privacy_unit_s: np.ndarray
    window_s: np.ndarray
    mechanisms: dict[str, int]

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Snapshot:
    """What one tick found: counts by status and reason, the fresh releases, and, when anything in it changed
    since the last tick, the lines of the private per-member status (``members.json``; None when unchanged)."""

    counts: dict[str, int]
    rejected_by_reason: dict[str, int]
    fresh: FreshReleases
    members_lines: list[bytes] | None


def members_json_chunks(snapshot: Snapshot, generated_at: datetime, chunk: int = 4096):
    """``members.json`` as UTF-8 chunks: {"generated_at": ..., "members": {"<member>": {...}, ...}}, one member
    per line, written without ever holding the whole text."""
    yield f'{{"generated_at": {_json_str(generated_at.isoformat())}, "members": {{\n'.encode()
    lines = snapshot.members_lines or []
    for i in range(0, len(lines), chunk):
        yield (b",\n" if i else b"") + b",\n".join(lines[i : i + chunk])
    yield b"\n}}\n"


class _Columns:
    """Numbers per slot, in numpy arrays grown by doubling."""

    def __init__(self, size: int = 1024):
        self.kind = np.full(size, FREE, dtype=np.int8)
        self.rendered = np.full(size, FREE, dtype=np.int8)  # the status written in the slot's line
        self.mech = np.zeros(size, dtype=np.int16)
        self.seen_us = np.zeros(size, dtype=np.int64)
        self.end_us = np.zeros(size, dtype=np.int64)
        for name in _FLOATS:
            setattr(self, name, np.zeros(size))

    def __len__(self) -> int:
        return len(self.kind)

    def grow(self) -> None:
        for name, old in list(vars(self).items()):
            new = np.full(2 * len(old), FREE, dtype=old.dtype) if name in ("kind", "rendered") else np.zeros(
                2 * len(old), dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)


class Collector:
    """Scans ``datasites/*/app_data/<app>/cpu_tracker.json``, caching a summary of each file by stat signature."""

    def __init__(self, datasites: Path, app_name: str, settings: Settings):
        self.datasites, self.app_name, self.settings = datasites, app_name, settings
        self._slot: dict[str, int] = {}  # member -> slot
        self._names: list[str | None] = []  # slot -> member (None: free)
        self._sig: list[tuple | None] = []  # slot -> (inode, size, mtime_ns) of the file summarised
        self._line: list[bytes | None] = []  # slot -> its line of members.json (ASCII)
        self._reason: dict[int, tuple[str, str]] = {}  # slot -> (reason, detail), rejected files only
        self._free: list[int] = []
        self._mechs: list[str] = []  # mechanism code -> name
        self._cols = _Columns()
        self._listing: list[str] = []  # the last tick's folder listing, in its order
        self._listing_slots: list[int] = []  # the slot of each name in it (-1: not a member)
        self._tick = 0
        self._last_transient: dict[str, tuple[str, str]] = {}
        self._proc_fd = os.path.isdir("/proc/self/fd")

    # -- one tick ------------------------------------------------------------------------------------------
    def collect(self, now: datetime) -> Snapshot:
        self._tick += 1
        ds = os.fspath(self.datasites)
        rel = f"app_data/{self.app_name}/{REPORT_FILE}"
        self._real_ds = os.path.realpath(ds)
        try:
            self._ds_fd = os.open(ds, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self._ds_fd = -1  # scandir below fails too: nothing is read
        try:
            return self._collect(now, ds, rel)
        finally:
            if self._ds_fd >= 0:
                os.close(self._ds_fd)

    def _collect(self, now: datetime, ds: str, rel: str) -> Snapshot:
        now_us = _us(now)
        new, changed, gone, transient = self._scan(ds, rel)
        joined_or_left = bool(gone)
        for slot in gone:
            self._drop(slot)
        pending = _Pending()
        for slot in changed:
            name = self._names[slot]
            got = self._read(ds, rel, name, now)
            if got is None:
                self._drop(slot)
                joined_or_left = True
            elif got[1] is None or (type(got[0]) is Rejected and got[0].reason == "future"):
                transient[name] = (got[0].reason, got[0].detail)  # time may cure it: retried, old summary kept
            else:
                self._store(slot, *got, now_us, pending)
        for name in new:  # not members yet: most folders hold no report (the aggregator's own, bystanders)
            got = self._read(ds, rel, name, now)
            if got is None:
                continue
            if got[1] is None or (type(got[0]) is Rejected and got[0].reason == "future"):
                transient[name] = (got[0].reason, got[0].detail)
                continue
            self._store(self._new_slot(name), *got, now_us, pending)
            joined_or_left = True
        pending.apply(self._cols)
        if joined_or_left or len(self._listing_slots) != len(self._listing):
            self._listing_slots = [self._slot.get(name, -1) for name in self._listing]
        return self._snapshot(now_us, transient, dirty=joined_or_left or bool(pending.slot))

    def _scan(self, ds: str, rel: str) -> tuple[list[str], list[int], list[int], dict[str, tuple[str, str]]]:
        """One pass over the datasites folder, one ``lstat`` per known member: (names not known yet, slots whose
        file changed, slots whose file is gone, rejections of this tick only). The folder lists its entries in
        the same order from one tick to the next while nobody joins or leaves, so each entry is matched
        against the last listing by position (no hash lookup); the first departure from it switches to
        lookups by name for the rest of the pass, and the new order is kept for the next tick."""
        last, last_slots, n = self._listing, self._listing_slots, len(self._listing)
        slot_of, sigs, lstat = self._slot.get, self._sig, os.lstat
        new: list[str] = []
        changed: list[int] = []
        gone: list[int] = []
        transient: dict[str, tuple[str, str]] = {}
        order = None  # this tick's listing, built only once it departs from the last one
        i = listed = 0
        try:
            entries = os.scandir(ds)
        except OSError:
            entries = None
        if entries is not None:
            with entries:
                for entry in entries:  # the hot loop: nothing more than the stat when the file is unchanged
                    name = entry.name
                    if order is None and i < n and last[i] == name:
                        slot = last_slots[i]
                        i += 1
                    else:
                        if order is None:
                            order = last[:i]
                        order.append(name)
                        slot = slot_of(name, -1)
                    if slot < 0:
                        new.append(name)
                        continue
                    listed += 1
                    try:
                        st = lstat(f"{ds}/{name}/{rel}")
                    except (FileNotFoundError, NotADirectoryError):
                        gone.append(slot)
                        continue
                    except OSError as e:
                        transient[name] = ("unreadable", str(e))
                        continue
                    if sigs[slot] != (st.st_ino, st.st_size, st.st_mtime_ns):
                        changed.append(slot)
        if order is None and i != n:
            order = last[:i]  # the listing ended early
        if order is not None:
            self._listing = order
            self._listing_slots = []  # rebuilt after this tick's joins and departures
        if listed != len(self._slot):  # some members' folders are gone
            present = set(self._listing)
            gone += [slot for name, slot in self._slot.items() if name not in present]
        return new, changed, gone, transient

    # -- reading one file ----------------------------------------------------------------------------------
    def _read(self, ds: str, rel: str, member: str, now: datetime):
        """(Accepted or Rejected, stat signature) for a new or changed file; signature None: do not cache;
        None: no report here (not a member of this app)."""
        inside = True
        try:
            try:
                fd = _openat2(self._ds_fd, os.fsencode(f"{member}/{rel}"))  # no symlink on the way: inside
            except _Unsupported:
                inside = False
                fd = os.open(f"{ds}/{member}/{rel}", _OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            return self._unopenable(member, f"{ds}/{member}/{rel}", e)
        try:
            st = os.fstat(fd)
            size, limit = st.st_size, self.settings.max_report_bytes
            sig = (st.st_ino, size, st.st_mtime_ns)
            try:
                check_member_name(member)
                if not stat.S_ISREG(st.st_mode):
                    raise Rejected("not_a_file")
                if size > limit:
                    raise Rejected("too_large", f"{size} bytes > {limit}")
                if not inside and not self._inside(member, fd, f"{ds}/{member}/{rel}", rel):
                    raise Rejected("symlink", "a folder on the way is a symlink leading outside the member's folder")
                data = os.read(fd, size + 1)  # all of it: a regular file reads short only at its end
                if len(data) > size:  # it grew since fstat
                    data = _read_rest(fd, data, limit + 1)
            except Rejected as r:
                return r, sig
            except OSError as e:
                return Rejected("unreadable", str(e)), sig
        finally:
            os.close(fd)
        try:
            return parse_report(data, now=now, settings=self.settings), sig
        except Rejected as r:
            return r, sig

    def _unopenable(self, member: str, path: str, error: OSError):
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            return Rejected("unreadable", str(e)), None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            check_member_name(member)
        except Rejected as r:
            return r, sig
        if stat.S_ISLNK(st.st_mode):
            return Rejected("symlink", "the report file is a symlink"), sig
        return Rejected("unreadable", str(error)), sig

    def _inside(self, member: str, fd: int, path: str, rel: str) -> bool:
        """True when the opened file lies in the member's own folder (no symlink on the way leads out)."""
        if self._proc_fd:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == f"{self._real_ds}/{member}/{rel}":
                    return True
            except OSError:
                pass
        own = os.path.join(self._real_ds, member)  # a symlinked member folder fails too
        return os.path.commonpath([own, os.path.realpath(path)]) == own

    # -- the cache -----------------------------------------------------------------------------------------
    def _new_slot(self, name: str) -> int:
        if self._free:
            slot = self._free.pop()
            self._names[slot] = name
        else:
            slot = len(self._names)
            self._names.append(name)
            self._sig.append(None)
            self._line.append(None)
            if slot >= len(self._cols):
                self._cols.grow()
        self._slot[name] = slot
        return slot

    def _drop(self, slot: int) -> None:
        del self._slot[self._names[slot]]
        self._names[slot] = self._sig[slot] = self._line[slot] = None
        self._reason.pop(slot, None)
        self._cols.kind[slot] = self._cols.rendered[slot] = FREE
        self._free.append(slot)

    def _store(self, slot: int, result: Accepted | Rejected, sig: tuple, now_us: int, pending: _Pending) -> None:
        """Record one parsed file: its signature, its line of members.json and (via ``pending``) its numbers."""
        self._sig[slot] = sig
        name = _json_str(self._names[slot])
        if type(result) is Rejected:
            self._reason[slot] = (result.reason, result.detail)
            self._line[slot] = _line(name, "rejected", result.reason, result.detail)
            pending.add(slot, REJECTED_FILE, 0, REJECTED, 0.0, 0.0, 0.0, 0.0, 0.0, now_us, 0)
            return
        self._reason.pop(slot, None)
        end = result.window_end
        if result.kind == "report":
            kind, status = REPORT, FRESH  # the line says fresh; _snapshot rewrites it if the report is stale
        else:
            kind, status = LEGACY_REPORT, LEGACY
        iso = result.window_end_text  # as the report wrote it; the ISO form datetime gives, when it is plain UTC
        iso = f"{iso[:19]}+00:00" if len(iso) == 20 and iso[19] == "Z" else end.isoformat()
        self._line[slot] = (f'{name}: {{"status": "{STATUSES[status]}", "reason": null, "detail": null, '
                            f'"window_end": "{iso}"}}').encode()
        mechs = self._mechs
        if result.mechanism not in mechs:
            mechs.append(result.mechanism)
        pending.add(slot, kind, mechs.index(result.mechanism), status, result.value, result.noise_scale,
                    result.epsilon, result.privacy_unit_s, result.window_s, now_us, _us(end))

    # -- the tick's result ---------------------------------------------------------------------------------
    def _snapshot(self, now_us: int, transient: dict[str, tuple[str, str]], *, dirty: bool) -> Snapshot:
        c, s = self._cols, self.settings
        report = c.kind == REPORT
        np.minimum(c.seen_us, now_us, out=c.seen_us)  # our clock stepped back: "seen" cannot lie in the future
        fresh = (report & ((now_us - c.seen_us) / 1e6 <= s.stale_after_s)
                 & ((now_us - c.end_us) / 1e6 <= s.stale_after_s + s.future_tolerance_s)
                 & ((c.end_us - now_us) / 1e6 <= s.future_tolerance_s))
        status = c.kind.copy()  # FREE stays FREE; REJECTED_FILE == 2 -> 3, LEGACY_REPORT == 1 -> 2, REPORT -> 0/1
        status[c.kind == REJECTED_FILE] = REJECTED
        status[c.kind == LEGACY_REPORT] = LEGACY
        status[report] = STALE
        status[fresh] = FRESH
        flipped = np.flatnonzero(status != c.rendered)  # only fresh <-> stale: every other change re-rendered
        for slot in flipped.tolist():
            old, new = STATUSES[c.rendered[slot]].encode(), STATUSES[status[slot]].encode()
            self._line[slot] = self._line[slot].replace(b'"status": "%s"' % old, b'"status": "%s"' % new, 1)
        c.rendered = status

        cached_transient = [self._slot[m] for m in transient if m in self._slot]  # rejected this tick only
        effective = status
        if cached_transient:
            effective = status.copy()
            effective[cached_transient] = REJECTED
            fresh[cached_transient] = False
        counts = np.bincount(effective[effective >= 0], minlength=4)
        by_reason = Counter(r for slot, (r, _) in self._reason.items() if slot not in cached_transient)
        by_reason.update(r for r, _ in transient.values())

        mech_counts = np.bincount(c.mech[fresh], minlength=len(self._mechs)).tolist()
        releases = FreshReleases(
            values=c.value[fresh], noise_scales=c.scale[fresh], epsilons=c.epsilon[fresh],
            privacy_unit_s=c.unit_s[fresh], window_s=c.window_s[fresh],
            mechanisms={m: n for m, n in zip(self._mechs, mech_counts) if n},
        )
        lines = None
        if dirty or flipped.size or transient != self._last_transient or self._tick == 1:
            lines = self._line
            if transient:
                lines = list(lines)
                for name, (reason, detail) in transient.items():
                    line = _line(_json_str(name), "rejected", reason, detail)
                    if name in self._slot:
                        lines[self._slot[name]] = line
                    else:
                        lines.append(line)
            lines = [x for x in lines if x is not None]
        self._last_transient = transient
        return Snapshot(
            counts={"fresh": int(counts[FRESH]), "stale": int(counts[STALE]), "legacy": int(counts[LEGACY]),
                    "rejected": int(counts[REJECTED]) + sum(1 for m in transient if m not in self._slot)},
            rejected_by_reason=dict(sorted(by_reason.items())),
            fresh=releases,
            members_lines=lines,
        )


class _Pending:
    """Numbers of the files parsed in this tick, gathered in compact arrays and written to the columns at once."""

    INTS = ("kind", "mech", "rendered", "seen_us", "end_us")

    def __init__(self):
        self.slot, self.kind, self.mech, self.rendered, self.seen_us, self.end_us = (array("q") for _ in range(6))
        self.value, self.scale, self.epsilon, self.unit_s, self.window_s = (array("d") for _ in _FLOATS)

    def add(self, slot, kind, mech, rendered, value, scale, epsilon, unit_s, window_s, seen_us, end_us) -> None:
        self.slot.append(slot)
        self.kind.append(kind)
        self.mech.append(mech)
        self.rendered.append(rendered)
        self.seen_us.append(seen_us)
        self.end_us.append(end_us)
        self.value.append(value)
        self.scale.append(scale)
        self.epsilon.append(epsilon)
        self.unit_s.append(unit_s)
        self.window_s.append(window_s)

    def apply(self, c: _Columns) -> None:
        if not self.slot:
            return
        idx = np.frombuffer(self.slot, dtype=np.int64)
        for name in self.INTS:
            getattr(c, name)[idx] = np.frombuffer(getattr(self, name), dtype=np.int64)
        for name in _FLOATS:
            getattr(c, name)[idx] = np.frombuffer(getattr(self, name), dtype=np.float64)


def _line(name_json: str, status: str, reason: str, detail: str) -> bytes:
    return (f'{name_json}: {{"status": "{status}", "reason": {_json_str(reason)}, "detail": {_json_str(detail)}, '
            f'"window_end": null}}').encode()


def _read_rest(fd: int, data: bytes, limit: int) -> bytes:
    """``data`` and what follows it in the open file, up to ``limit`` bytes in all."""
    while len(data) < limit and (chunk := os.read(fd, limit - len(data))):
        data += chunk
    return data[:limit]


# ---------------------------------------------------------------------------------------------------------
# openat2(2) with RESOLVE_NO_SYMLINKS (Linux 5.6+), through ctypes: one call that opens a file below a folder
# only if no component of the relative path is a symlink
# ---------------------------------------------------------------------------------------------------------
class _Unsupported(Exception):
    """openat2 cannot decide here (not Linux, too old a kernel, refused by a sandbox, or a symlink on the
    way): take the general path."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number in the x86_64 and the generic (arm64) syscall tables
_RESOLVE_NO_SYMLINKS = 0x04
_openat2_call = None
if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64"):
    try:
        _openat2_call = ctypes.CDLL(None, use_errno=True).syscall
        _openat2_call.restype = ctypes.c_long
        _HOW = _OpenHow(_OPEN_FLAGS, 0, _RESOLVE_NO_SYMLINKS)
        _HOW_REF, _HOW_SIZE = ctypes.byref(_HOW), ctypes.sizeof(_HOW)
    except (OSError, AttributeError):
        _openat2_call = None


def _openat2(dir_fd: int, rel: bytes) -> int:
    """A descriptor for ``rel`` below ``dir_fd``, refusing symlinks anywhere on the way. Raises the OSError
    of a missing file, or _Unsupported when the general path must decide."""
    global _openat2_call
    if _openat2_call is None or dir_fd < 0:
        raise _Unsupported
    fd = _openat2_call(_SYS_OPENAT2, dir_fd, rel, _HOW_REF, _HOW_SIZE)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.ENOTDIR):
        raise OSError(err, os.strerror(err))  # FileNotFoundError / NotADirectoryError
    if err in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG):
        _openat2_call = None  # not available here: never try again
    raise _Unsupported  # ELOOP (a symlink), EACCES, ...: the general path decides and names the reason
