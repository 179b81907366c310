"""Who reported what: one entry per member, re-read only when its file changes, and each member's status.

A tick lists the datasites folder and ``lstat``s each known member's report: a file is read again (``reader``) and
parsed again (``validate``) only when its (inode, size, mtime_ns) changed. Each member has one ``Entry`` (the
accepted summary or the rejection, the stat signature, when the aggregator first saw this content) and one status
(fresh, stale, legacy or rejected, with its reason), derived by ``status_of``. A status changes with the time only
at a few known instants (``next_change_us``), so the roster keeps a heap of them and re-derives only the statuses
that are due: a warm tick costs one ``lstat`` per member and nothing per member beyond it.

Freshness is judged on the aggregator's own clock (``is_fresh``), so a member whose clock is off by minutes is
neither dropped nor kept forever. A member's report is read from ``app_data/<app>/``, or, failing that, from the
tutorial's ``api_data/<app>/``: one entry per member, the ``app_data`` report preferred.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import struct
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import numpy as np

from cpu_tracker_aggregator.reader import Read, open_datasites, read_report
from cpu_tracker_aggregator.validate import (
    Accepted,
    Rejected,
    check_member_name,
    future_detail,
    is_future,
    iso,
    parse_report,
    us,
)
from shared.atomic import stat_signature
from shared.paths import Paths
from shared.settings import Settings

STATUSES = ("fresh", "stale", "legacy", "rejected")
_NUMBERS = struct.Struct("=5d")  # value, noise scale, epsilon, privacy unit (s), window (s) of one release
_json_str = json.encoder.encode_basestring_ascii  # a JSON string literal, in C
_BATCH = 256  # files read, then parsed, then stored, at a time
_BY_NAME = ("bad_folder_name", "not_member")  # rejections decided by the member's name alone


class Entry(NamedTuple):
    """One member's report as last read (compact: 100,000 of them are held)."""

    kind: str  # "report", "legacy" or "rejected"
    seen_us: int  # when the aggregator first saw this content (microseconds since the epoch)
    ino: int | None  # the stat signature of the file read (None: unknown, read again next tick)
    size: int
    mtime_ns: int
    end_us: int = 0  # the report's own time: its window's end (legacy: its timestamp)
    numbers: bytes = b""  # _NUMBERS of the release (reports only)
    mechanism: str = ""
    reason: str = ""  # rejected: why
    detail: str = ""
    api_data: bool = False  # read from the tutorial's api_data folder


def accepted_entry(accepted: Accepted, sig: tuple[int, int, int] | None, seen_us: int, api_data: bool = False) -> Entry:
    ino, size, mtime = sig or (None, 0, 0)
    a = accepted
    numbers = b""
    if a.kind == "report":
        numbers = _NUMBERS.pack(a.value, a.noise_scale, a.epsilon, a.privacy_unit_s, a.window_s)
    return Entry(a.kind, seen_us, ino, size, mtime, us(a.window_end), numbers, sys.intern(a.mechanism),
                 api_data=api_data)


def rejected_entry(rejected: Rejected, sig: tuple[int, int, int] | None, seen_us: int, api_data: bool = False) -> Entry:
    ino, size, mtime = sig or (None, 0, 0)
    return Entry("rejected", seen_us, ino, size, mtime, reason=rejected.reason, detail=rejected.detail,
                 api_data=api_data)


def is_fresh(entry: Entry, now_us: int, settings: Settings) -> bool:
    """The one freshness rule: fresh while the aggregator first saw the current content (or, for a file first seen
    dated beyond ``future_tolerance_s``, saw it come within it) at most ``stale_after_s`` ago, and the report's own
    time lies no further than ``future_tolerance_s + stale_after_s`` in the past and no further than
    ``future_tolerance_s`` ahead. Our clock stepping back makes no content seen in the future."""
    stale, tol = settings.stale_after_s * 1e6, settings.future_tolerance_s * 1e6
    since_acceptable = now_us - entry.end_us + tol
    return (min(max(0, now_us - entry.seen_us), since_acceptable) <= stale and since_acceptable >= 0
            and now_us - entry.end_us <= stale + tol)


def status_of(entry: Entry, now_us: int, settings: Settings) -> tuple[str, str | None]:
    """(status, rejection reason or None) of a member's entry at ``now_us``."""
    if entry.kind == "rejected":
        return "rejected", entry.reason
    if is_future(entry.end_us, now_us, settings):
        return "rejected", "future"
    fresh = is_fresh(entry, now_us, settings)
    if entry.kind == "legacy":
        return ("legacy" if fresh else "stale"), None
    return ("fresh" if fresh else "stale"), None


def next_change_us(entry: Entry, now_us: int, settings: Settings) -> int | None:
    """The first instant after ``now_us`` at which ``status_of`` may change (None: never, unless the file does)."""
    return min((t for t in _boundaries(entry, settings) if t > now_us), default=None)


def _boundaries(entry: Entry, settings: Settings) -> tuple[int, ...]:
    """The instants at which a comparison in is_future / is_fresh flips: at the instant itself (>=), or just
    after it (>)."""
    if entry.kind == "rejected":
        return ()
    stale, tol, end = settings.stale_after_s * 1e6, settings.future_tolerance_s * 1e6, entry.end_us
    return (math.ceil(end - tol), math.floor(entry.seen_us + stale) + 1, math.floor(end - tol + stale) + 1,
            math.floor(end + stale + tol) + 1)


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


class Roster:
    """Every member's entry and status, kept up to date by ``tick``."""

    def __init__(self, paths: Paths, settings: Settings):
        self.settings = settings
        self.ds = os.fspath(paths.datasites)
        probe = "member@example.org"
        self.parts = paths.report_file(probe).relative_to(paths.datasites / probe).parts
        self.legacy_parts = paths.legacy_report_file(probe).relative_to(paths.datasites / probe).parts
        self._rel, self._legacy_rel = "/".join(self.parts), "/".join(self.legacy_parts)
        self.allowed = None if settings.members is None else frozenset(settings.members)
        self.entries: dict[str, Entry] = {}
        self._state: dict[str, tuple[str, str | None, str]] = {}  # member -> (status, rejection reason, mechanism)
        self._lines: dict[str, bytes] = {}  # member -> its line of members.json
        self._counts: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._fresh_numbers: dict[str, bytes] = {}  # the fresh entries' numbers, joined into FreshReleases
        self._mechanisms: Counter[str] = Counter()  # of the fresh entries
        self._releases: FreshReleases | None = None  # built from _fresh_numbers when needed
        self._due: list[tuple[int, int, list[str]]] = []  # heap of (instant, sequence, members to re-derive then)
        self._pending: dict[int, list[str]] = {}
        self._seq = 0
        self._last_now: int | None = None
        self._lines_changed = True  # the first tick writes members.json

    # -- one tick ------------------------------------------------------------------------------------------
    def tick(self, now: datetime) -> Snapshot:
        now_us = us(now)
        if self._last_now is not None and now_us < self._last_now:  # our clock stepped back: re-derive everything
            self._due, self._pending = [], {}
            for name, entry in self.entries.items():
                self._derive(name, entry, now_us)
        self._last_now = now_us
        changed, new, gone = self._scan()
        for name in gone:
            self._forget(name)
        todo = changed + new  # most new names hold no report (the aggregator's own datasite, bystanders)
        ds_fd = open_datasites(self.ds)
        try:
            for i in range(0, len(todo), _BATCH):  # in batches, each step in a row: the CPU caches stay warm
                batch = todo[i : i + _BATCH]
                got = [self._fetch(ds_fd, name, now_us) for name in batch]  # system calls
                got = [self._entry(*g, now_us) if type(g) is tuple else g for g in got]  # parsing
                for name, entry in zip(batch, got):
                    if entry is not None:
                        self._store(name, entry, now_us)
                    elif name in self.entries:
                        self._forget(name)
        finally:
            if ds_fd >= 0:
                os.close(ds_fd)
        self._advance(now_us)
        return self._snapshot()

    def _scan(self) -> tuple[list[str], list[str], list[str]]:
        """One pass over the datasites folder, one ``lstat`` per known member: (members whose file changed, names
        without an entry, members whose folder is gone)."""
        ds, rel, legacy_rel, get, lstat = self.ds, self._rel, self._legacy_rel, self.entries.get, os.lstat
        changed: list[str] = []
        new: list[str] = []
        listed = 0
        try:
            names = os.scandir(ds)
        except OSError:
            names = None
        if names is not None:
            with names:
                for item in names:  # the hot loop: nothing more than the lstat when the file is unchanged
                    name = item.name
                    e = get(name)
                    if e is None:
                        new.append(name)
                        continue
                    listed += 1
                    try:
                        st = lstat(f"{ds}/{name}/{rel}")
                    except OSError:
                        if not e.api_data:
                            changed.append(name)  # gone, or unreadable: read again (from api_data, perhaps)
                            continue
                        try:
                            st = lstat(f"{ds}/{name}/{legacy_rel}")
                        except OSError:
                            changed.append(name)
                            continue
                    else:
                        if e.api_data:  # an app_data report appeared: it wins
                            changed.append(name)
                            continue
                    if st.st_ino != e.ino or st.st_mtime_ns != e.mtime_ns or st.st_size != e.size:
                        changed.append(name)
        gone: list[str] = []
        if listed != len(self.entries):  # some members' folders are gone
            present = set(os.listdir(ds)) if names is not None else set()
            gone = [name for name in self.entries if name not in present]
        return changed, new, gone

    # -- reading one member --------------------------------------------------------------------------------
    def _fetch(self, ds_fd: int, name: str, now_us: int) -> Entry | tuple[Read, bool] | None:
        """``name``'s report as it is now: its bytes (with whether it came from api_data) to parse, or already an
        entry when it cannot be read or must not be; None when there is none (not a member of this app)."""
        s = self.settings
        refused = None
        known = self.entries.get(name)
        if known is None or known.reason in _BY_NAME:  # a name once accepted stays acceptable
            try:
                check_member_name(name)
            except Rejected as r:
                refused = r
            if refused is None and self.allowed is not None and name not in self.allowed:
                refused = Rejected("not_member", f"{name} is not on the aggregator's members list")
        if refused is not None:  # not read at all: only whether there is a report
            found = self._lstat(name)
            return None if found is None else rejected_entry(refused, found[0], now_us, found[1])
        api_data = False
        got = read_report(ds_fd, self.ds, (name, *self.parts), s.max_report_bytes)
        if got is None:
            api_data = True
            got = read_report(ds_fd, self.ds, (name, *self.legacy_parts), s.max_report_bytes)
            if got is None:
                return None
        if type(got.data) is not bytes:
            return rejected_entry(got.data, got.sig, now_us, api_data)
        return got, api_data

    def _entry(self, got: Read, api_data: bool, now_us: int) -> Entry:
        try:
            return accepted_entry(parse_report(got.data, settings=self.settings), got.sig, now_us, api_data)
        except Rejected as r:
            return rejected_entry(r, got.sig, now_us, api_data)

    def _lstat(self, name: str) -> tuple[tuple[int, int, int], bool] | None:
        for rel, api_data in ((self._rel, False), (self._legacy_rel, True)):
            try:
                return stat_signature(os.lstat(f"{self.ds}/{name}/{rel}")), api_data
            except OSError:
                pass
        return None

    # -- statuses ------------------------------------------------------------------------------------------
    def _store(self, name: str, entry: Entry, now_us: int) -> None:
        self.entries[name] = entry
        self._derive(name, entry, now_us, new_content=True)

    def _forget(self, name: str) -> None:
        self.entries.pop(name, None)
        old = self._state.pop(name, None)
        if old is not None:
            self._uncount(name, old)
            del self._lines[name]
            self._lines_changed = True

    def _derive(self, name: str, entry: Entry, now_us: int, new_content: bool = False) -> None:
        """Set ``name``'s status from its entry at ``now_us`` and schedule its next change."""
        status, reason = status_of(entry, now_us, self.settings)
        old = self._state.get(name)
        if old is None or new_content or old[0] != status or old[1] != reason:
            if old is not None:
                self._uncount(name, old)
            line = self._line(name, entry, status, reason, None if new_content else old)
            if self._lines.get(name) != line:
                self._lines[name] = line
                self._lines_changed = True
            self._state[name] = (status, reason, entry.mechanism)
            self._counts[status] += 1
            if reason:
                self._reasons[reason] += 1
            if status == "fresh":
                self._fresh_numbers[name] = entry.numbers
                self._mechanisms[entry.mechanism] += 1
                self._releases = None
        due = next_change_us(entry, now_us, self.settings)
        if due is not None:
            self._pending.setdefault(due, []).append(name)

    def _uncount(self, name: str, old: tuple[str, str | None, str]) -> None:
        self._counts[old[0]] -= 1
        if old[1]:
            self._reasons[old[1]] -= 1
        if old[0] == "fresh":
            self._mechanisms[old[2]] -= 1
            del self._fresh_numbers[name]
            self._releases = None

    def _line(self, name: str, entry: Entry, status: str, reason: str | None, old) -> bytes:
        """``name``'s line of members.json; from ``old`` (a status change between fresh, stale and legacy) by
        replacing the status alone."""
        if old is not None and reason is None and old[1] is None:
            return self._lines[name].replace(b'"status": "%s"' % old[0].encode(), b'"status": "%s"' % status.encode(),
                                             1)
        member = _json_str(name)
        if reason is not None:
            detail = entry.detail if entry.kind == "rejected" else future_detail(entry.end_us, self.settings)
            return (f'{member}: {{"status": "rejected", "reason": {_json_str(reason)}, "detail": {_json_str(detail)}, '
                    f'"window_end": null}}').encode()
        return (f'{member}: {{"status": "{status}", "reason": null, "detail": null, '
                f'"window_end": "{iso(entry.end_us)}"}}').encode()

    def _advance(self, now_us: int) -> None:
        """Re-derive the statuses due by ``now_us``; then file this tick's new due instants."""
        due, entries, s = self._due, self.entries, self.settings
        while due and due[0][0] <= now_us:
            at, _, names = heapq.heappop(due)
            for name in names:
                entry = entries.get(name)
                if entry is not None and at in _boundaries(entry, s):  # not an instant of a file since replaced
                    self._derive(name, entry, now_us)
        for at, names in self._pending.items():
            self._seq += 1
            heapq.heappush(due, (at, self._seq, names))
        self._pending = {}

    def _snapshot(self) -> Snapshot:
        if self._releases is None:
            self._releases = _releases(self._fresh_numbers.values(), self._mechanisms)
        lines = None
        if self._lines_changed:
            lines = list(self._lines.values())
            self._lines_changed = False
        return Snapshot(
            counts={status: self._counts[status] for status in STATUSES},
            rejected_by_reason={r: n for r, n in sorted(self._reasons.items()) if n},
            fresh=self._releases,
            members_lines=lines,
        )


def _releases(numbers, mechanisms: Counter[str]) -> FreshReleases:
    columns = np.frombuffer(b"".join(numbers), dtype=np.float64).reshape(-1, _NUMBERS.size // 8)
    return FreshReleases(values=columns[:, 0], noise_scales=columns[:, 1], epsilons=columns[:, 2],
                         privacy_unit_s=columns[:, 3], window_s=columns[:, 4],
                         mechanisms={m: n for m, n in sorted(mechanisms.items()) if n})
