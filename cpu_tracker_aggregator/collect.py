"""Finding and checking every member's report, re-reading only what changed since the last tick.

A file is re-parsed only when its (inode, size, mtime) changes; otherwise the cached outcome is reused
and only its freshness, which depends on the time, is re-evaluated.

Freshness is judged on the aggregator's own clock, so a member whose clock is off by minutes is neither
dropped nor kept forever: a report is fresh while the aggregator first saw its current content less
than ``stale_after_s`` ago, provided the report's own time is no further than ``future_tolerance_s +
stale_after_s`` in the past (an old file found at start-up is not fresh). Each file is handled in its own
``try``: one bad file never stops a tick.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from cpu_tracker_aggregator.validate import Accepted, Rejected, check_member_name, parse_report
from shared.paths import REPORT_FILE
from shared.settings import Settings

Status = Literal["fresh", "stale", "legacy", "rejected"]


@dataclass(frozen=True)
class MemberOutcome:
    member: str
    status: Status
    accepted: Accepted | None = None
    reason: str = ""
    detail: str = ""


@dataclass
class Collector:
    """Scans ``datasites/*/app_data/<app>/cpu_tracker.json``, caching parsed files by stat signature."""

    datasites: Path
    app_name: str
    settings: Settings
    _cache: dict[str, tuple[tuple[int, int, int], Accepted | Rejected, datetime]] = field(default_factory=dict)

    def collect(self, now: datetime) -> list[MemberOutcome]:
        outcomes = []
        seen = set()
        try:
            entries = os.scandir(self.datasites)
        except OSError:
            return []
        with entries:
            for entry in entries:
                seen.add(entry.name)
                outcome = self._one(entry.name, now)
                if outcome is not None:
                    outcomes.append(outcome)
        for gone in self._cache.keys() - seen:
            del self._cache[gone]
        return outcomes

    def _one(self, member: str, now: datetime) -> MemberOutcome | None:
        path = os.path.join(self.datasites, member, "app_data", self.app_name, REPORT_FILE)
        try:
            st = os.stat(path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(member, None)
            return None  # not a member of this app
        except OSError as e:
            return MemberOutcome(member, "rejected", reason="unreadable", detail=str(e))
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(member)
        if cached is not None and cached[0] == sig:
            _, result, seen_at = cached
        else:
            result, seen_at = self._parse(member, path, st, now), now
            if not (isinstance(result, Rejected) and result.reason == "future"):  # time may cure it
                self._cache[member] = (sig, result, seen_at)
        if isinstance(result, Rejected):
            return MemberOutcome(member, "rejected", reason=result.reason, detail=result.detail)
        if result.kind == "legacy":
            return MemberOutcome(member, "legacy", accepted=result)
        s = self.settings
        fresh = (now - seen_at).total_seconds() <= s.stale_after_s and result.is_fresh(
            now, s.stale_after_s + s.future_tolerance_s
        )
        return MemberOutcome(member, "fresh" if fresh else "stale", accepted=result)

    def _parse(self, member: str, path: str, st: os.stat_result, now: datetime) -> Accepted | Rejected:
        try:
            check_member_name(member)
            if stat.S_ISLNK(st.st_mode):
                raise Rejected("symlink", "the report file is a symlink")
            if not stat.S_ISREG(st.st_mode):
                raise Rejected("not_a_file")
            if st.st_size > self.settings.max_report_bytes:
                raise Rejected("too_large", f"{st.st_size} bytes > {self.settings.max_report_bytes}")
            own = os.path.join(os.path.realpath(self.datasites), member)  # a symlinked member folder fails too
            if os.path.commonpath([own, os.path.realpath(path)]) != own:
                raise Rejected("symlink", "a folder on the way is a symlink leading outside the member's folder")
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = f.read(self.settings.max_report_bytes + 1)
            return parse_report(data, now=now, settings=self.settings)
        except Rejected as r:
            return r
        except OSError as e:
            return Rejected("unreadable", str(e))
