"""The public folder, written so that what changes every tick stays small however long the history grows.

Every syftbox 0.4.0 client mirrors every file it may read, and the relay sends each client an rsync diff of
each changed file (4 KB blocks: a small file costs its whole size). So what changes every tick stays small:
``current.json`` (the figure now and the open 5-minute block, ``Current``) is rewritten only on change; the history
lies in segments (``Segment``, listed in ``history/index.json``), one per UTC hour of ticks (kept 24 h) and one per UTC
day of 5-minute points (kept 30 days), each growing one closed 5-minute block at a time and never rewritten once its
hour or day is over; the schema-1 ``dashboard.json`` with the whole history, for old readers, is rewritten every
``LEGACY_EVERY_S`` (and when the status or the lead changes), not every tick. The folder is drawn in
``shared/paths.py``; each file's size and rate, and what they cost the relay, in ``docs/dashboard.md``.

Nothing here is written when nothing changed: the caller publishes only ticks that changed something.
"""

from __future__ import annotations

import bisect
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from cpu_tracker_aggregator.dashboard import COARSE_S, COARSE_STEP_S, COLUMNS, RECENT_S
from shared.atomic import atomic_write_bytes
from shared.paths import CURRENT_FILE, DASHBOARD_FILE, HISTORY_DIR, HISTORY_INDEX_FILE
from shared.wire.schema import Current, Dashboard, History, HistoryIndex, OpenPoints, Point, Segment, Series

log = logging.getLogger("cpu_tracker.aggregator")
BLOCK_S = COARSE_STEP_S  # points reach a segment once their 5-minute block has closed
SEGMENT_S = {"recent": 3600, "coarse": 86400}
RETENTION_S = {"recent": RECENT_S, "coarse": COARSE_S}
NAME_FORMAT = {"recent": "%Y%m%dT%H", "coarse": "%Y%m%d"}
LEGACY_EVERY_S = 1800


def segment_name(series: str, start: int) -> str:
    return f"{series}-{datetime.fromtimestamp(start, timezone.utc).strftime(NAME_FORMAT[series])}.json"


def segment_start(name: str) -> tuple[str, int] | None:
    """(series, period start) of a segment file name, or None if ``name`` is not one."""
    series, _, stamp = name.removesuffix(".json").partition("-")
    if series not in SEGMENT_S or not name.endswith(".json"):
        return None
    try:
        t = datetime.strptime(stamp, NAME_FORMAT[series]).replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return series, int(t.timestamp())


def points_between(s: Series, lo: int, hi: int) -> list[Point]:
    """The points of ``s`` with lo <= t < hi (``s.t`` is increasing), as rows."""
    i, j = bisect.bisect_left(s.t, lo), bisect.bisect_left(s.t, hi)
    return list(zip(*(getattr(s, c)[i:j] for c in COLUMNS)))


def open_points(history: History, block_start: int) -> OpenPoints:
    """The points no segment holds yet: those of the open 5-minute block (t >= ``block_start``)."""
    far = 2**62
    return OpenPoints(recent=points_between(history.recent, block_start, far),
                      coarse=points_between(history.coarse, block_start, far))


class Publisher:
    """Writes the public folder's history segments, index, current figure and legacy dashboard. Keeps what it
    last wrote (by name) so that an unchanged file is never rewritten; a segment whose period has ended is
    written once, complete, and never again."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.history_dir = self.folder / HISTORY_DIR
        self._last: dict[str, bytes] = {}  # file (relative to folder) -> the bytes it holds, as far as we know
        self._final: set[str] = set()  # segments written after their period ended: never again
        self._unfinished: dict[str, tuple[str, int]] = {}  # segments an earlier process left incomplete
        self._legacy_at: int | None = None
        self._legacy_status: tuple | None = None  # status, lead, alerts' states: a change rewrites it at once
        self._loaded = False

    def publish(self, dashboard: Dashboard, now: int) -> list[str]:
        """Write what changed for the tick at unix time ``now``; returns the names written. Raises OSError."""
        if not self._loaded:
            self._load()
        written: list[str] = []
        block_start = now - now % BLOCK_S
        present: dict[str, list[tuple[int, str]]] = {"recent": [], "coarse": []}
        for series_name, seg_s in SEGMENT_S.items():
            series: Series = getattr(dashboard.history, series_name)
            keep_after = now - RETENTION_S[series_name]
            closed = bisect.bisect_left(series.t, block_start)  # points before it lie in closed blocks
            first = series.t[0] - series.t[0] % seg_s if closed else block_start
            starts = set(range(first, block_start, seg_s))
            starts |= {st for n, (se, st) in self._unfinished.items() if se == series_name}  # left by a stop
            for start in sorted(starts):
                end = start + seg_s
                name = segment_name(series_name, start)
                if end <= keep_after or name in self._final:
                    continue
                points = _grown(self._unfinished.get(name) and self._disk_points(name),
                                points_between(series, start, min(end, block_start)))
                if not points:
                    continue
                present[series_name].append((start, name))
                complete = end <= block_start
                seg = Segment(series=series_name, start=start, end=end, resolution_s=series.resolution_s,
                              complete=complete, points=points)
                if self._write(f"{HISTORY_DIR}/{name}", seg.model_dump_json().encode() + b"\n"):
                    written.append(name)
                self._unfinished.pop(name, None)
                if complete:
                    self._final.add(name)
            listed = {n for _, n in present[series_name]}
            for name in self._final - listed:  # written earlier, still kept, no longer in the history held
                parsed = segment_start(name)
                if parsed and parsed[0] == series_name and parsed[1] + seg_s > keep_after:
                    present[series_name].append((parsed[1], name))
                    listed.add(name)
            written += self._expire(series_name, keep_after, listed)
        index = HistoryIndex(recent=[n for _, n in sorted(present["recent"])],
                             coarse=[n for _, n in sorted(present["coarse"])])
        if self._write(HISTORY_INDEX_FILE, index.model_dump_json().encode() + b"\n"):
            written.append(HISTORY_INDEX_FILE)
        current = Current(**dashboard.model_dump(exclude={"history", "schema_version", "kind"}),
                          open=open_points(dashboard.history, block_start))
        if self._write(CURRENT_FILE, current.model_dump_json().encode() + b"\n"):
            written.append(CURRENT_FILE)
        if (self._legacy_at is None or abs(now - self._legacy_at) >= LEGACY_EVERY_S
                or (dashboard.status, dashboard.lead, dashboard.alerts) != self._legacy_status):
            if self._write(DASHBOARD_FILE, dashboard.model_dump_json().encode() + b"\n"):
                written.append(DASHBOARD_FILE)
            self._legacy_at, self._legacy_status = now, (dashboard.status, dashboard.lead, dashboard.alerts)
        return written

    def repair(self) -> list[str]:
        """Write again every file this publisher wrote that is missing or not the size it wrote (deleted or edited
        behind its back). Costs one stat per file; returns the names rewritten."""
        fixed = []
        for name, data in list(self._last.items()):
            try:
                if os.stat(self.folder / name).st_size == len(data):
                    continue
            except FileNotFoundError:
                pass
            atomic_write_bytes(self.folder / name, data, durable=False)
            fixed.append(name)
        return fixed

    def _write(self, name: str, data: bytes) -> bool:
        if self._last.get(name) == data:
            return False
        # after a crash the old file or the new one is there, which is all that matters: no folder fsync
        atomic_write_bytes(self.folder / name, data, durable=False)
        self._last[name] = data
        return True

    def _expire(self, series: str, keep_after: int, present: set[str]) -> list[str]:
        """Remove the series' segment files whose period lies wholly before ``keep_after``."""
        removed = []
        for name in sorted(self._on_disk()):
            parsed = segment_start(name)
            if parsed and parsed[0] == series and name not in present and parsed[1] + SEGMENT_S[series] <= keep_after:
                try:
                    os.unlink(self.history_dir / name)
                    removed.append(name)
                except FileNotFoundError:
                    pass
                self._last.pop(f"{HISTORY_DIR}/{name}", None)
                self._final.discard(name)
        return removed

    def _on_disk(self) -> list[str]:
        try:
            return os.listdir(self.history_dir)
        except FileNotFoundError:
            return []

    def _load(self) -> None:
        """What an earlier process left: a segment marked complete is final (never rewritten); any other one is
        completed at the next publish from the history held, growing only at its end (points the history no longer
        holds are kept)."""
        for name in self._on_disk():
            parsed = segment_start(name)
            if parsed is None:
                continue
            try:
                data = (self.history_dir / name).read_bytes()
                complete = Segment.model_validate_json(data).complete
            except (OSError, ValueError):
                continue  # unreadable: rewritten from the history, as if it were not there
            self._last[f"{HISTORY_DIR}/{name}"] = data
            if complete:
                self._final.add(name)
            else:
                self._unfinished[name] = parsed
        self._loaded = True

    def _disk_points(self, name: str) -> list[Point]:
        return Segment.model_validate_json(self._last[f"{HISTORY_DIR}/{name}"]).points


def _grown(old: list[Point] | None, new: list[Point]) -> list[Point]:
    """``old`` followed by the points of ``new`` later than its last: a segment only ever grows at its end."""
    if not old:
        return new
    return [*old, *(p for p in new if p[0] > old[-1][0])]


def read_history(folder: Path) -> tuple[Current, History]:
    """What a reader of the public folder sees: the current figure and the whole history, assembled as the page
    and docs/dashboard.md's recipe do (each indexed segment's points in order, then ``current.open``). A segment that
    is listed but not there yet (still syncing) is left out. Raises OSError / ValueError for an unreadable
    current.json or index."""
    folder = Path(folder)
    current = Current.model_validate_json((folder / CURRENT_FILE).read_bytes())
    index = HistoryIndex.model_validate_json((folder / current.history_index).read_bytes())
    series = {}
    for name, resolution in (("recent", current.settings.tick_s), ("coarse", float(BLOCK_S))):
        parts: list[list[Point]] = []
        for seg_name in getattr(index, name):
            try:
                seg = Segment.model_validate_json((folder / HISTORY_DIR / seg_name).read_bytes())
            except (OSError, ValueError):  # not synced yet, or half-synced: left out until the next read
                continue
            parts.append(seg.points)
            resolution = seg.resolution_s
        parts.append(getattr(current.open, name))
        series[name] = concatenate(parts, resolution)
    return current, History(**series)


def concatenate(parts: list[list[Point]], resolution_s: float) -> Series:
    """The parts' rows in order as a ``Series``, keeping only points later than every point before them: files
    written or synced at different moments may repeat a point (a block just closed into a segment while an
    older current.json still holds it as open)."""
    rows: list[Point] = []
    for part in parts:
        rows += [p for p in part if not rows or p[0] > rows[-1][0]]
    return Series(resolution_s=resolution_s, **{c: [p[i] for p in rows] for i, c in enumerate(COLUMNS)})
