"""The aggregator's I/O: one tick reads the members' reports and writes the dashboard and private status."""

from __future__ import annotations

import bisect
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from threading import Event
from typing import Callable

from pydantic import ValidationError

from cpu_tracker_aggregator.collect import Collector, Snapshot, members_json_chunks
from cpu_tracker_aggregator.dashboard import COLUMNS, build_dashboard, empty_history
from shared.atomic import atomic_write_chunks, atomic_write_text, write_if_changed
from shared.logs import Problems
from shared.paths import Paths
from shared.permissions import ensure_permissions
from shared.schema import Dashboard, History, Series, json_schemas, schema_text, utc_now
from shared.settings import Settings

log = logging.getLogger("cpu_tracker.aggregator")
PAGE = Path(__file__).parent / "page" / "index.html"


@dataclass
class Aggregator:
    paths: Paths
    settings: Settings
    problems: Problems
    collector: Collector = field(init=False)
    history: History = field(init=False)
    _members_pending: Snapshot | None = field(init=False, default=None)
    _history_json: HistoryJSON = field(init=False, default_factory=lambda: HistoryJSON())
    _published_once: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.collector = Collector(self.paths.datasites, self.paths.app_name, self.settings)
        self.history = self._load_history()

    def _load_history(self) -> History:
        path = self.paths.history_file
        try:
            return History.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return empty_history(self.settings)
        except (OSError, ValueError, ValidationError) as e:
            aside = path.with_suffix(f".unreadable-{int(time.time())}")
            log.error("history %s unreadable (%s); starting a new one, old file kept as %s", path, e, aside.name)
            try:
                path.rename(aside)
            except OSError:
                pass
            return empty_history(self.settings)

    def tick(self, now: datetime) -> Dashboard:
        """Read every report, publish the dashboard. Problems are logged once; the tick always completes."""
        snapshot = self.collector.collect(now)
        dashboard = build_dashboard(snapshot, self.history, now, self.settings)
        self.history = dashboard.history
        history = self._history_json.encode(self.history)  # the bulk of both files (24 h + 30 days of points)
        self._write_private(snapshot, now, history)  # first: a crash must never take back a published point
        self._publish(dashboard, history)
        return dashboard

    def _publish(self, dashboard: Dashboard, history: str) -> None:
        folder = self.paths.public_dir()
        try:
            fixed = ensure_permissions(folder, self.paths.email, ["*"])
            if fixed and self._published_once:  # the first tick writes them silently
                log.warning("repaired %s in %s (missing or changed)", ", ".join(fixed), folder)
            self._published_once = True
            for name, data in _static_files().items():
                write_if_changed(folder / name, data)
            head = json.dumps(dashboard.model_dump(mode="json", exclude={"history"}), allow_nan=False, ensure_ascii=False)
            # rewritten every tick: after a crash the old file or the new one is there, which is all that matters,
            # so the folder is not fsynced (the file is)
            atomic_write_text(self.paths.dashboard_file, f'{head[:-1]}, "history": {history}}}\n', durable=False)
            self.problems.clear("publish", "dashboard published again")
        except OSError as e:
            self.problems.report("publish", f"cannot publish to {folder}: {e}. Check disk space and permissions.")

    def _write_private(self, snapshot: Snapshot, now: datetime, history: str) -> None:
        """History every tick; the per-member status only when it changed (writing it is O(members))."""
        if snapshot.members_lines is not None:
            self._members_pending = snapshot
        try:
            if self._members_pending is not None:
                # derived state, rewritten by the next change and at every start: no fsync
                atomic_write_chunks(self.paths.members_status_file, members_json_chunks(self._members_pending, now),
                                    durable=False, fsync=False)
                self._members_pending = None
            atomic_write_text(self.paths.history_file, history + "\n")  # durable: it must outlive the dashboard
            self.problems.clear("private", "private status written again")
        except OSError as e:  # the per-member status is retried next tick, even if nothing changes
            self.problems.report("private", f"cannot write {self.paths.private}: {e}. History may be lost on restart.")


class HistoryJSON:
    """The history as JSON text (exactly ``json.dumps(history.model_dump(mode="json"))``), re-encoding only the
    points that changed since the last call: a tick adds a point, drops the oldest and refreshes the open
    5-minute bucket, so re-encoding 2 x 8,640 points every tick would be almost all waste."""

    def __init__(self):
        self._columns: dict[tuple[str, str], tuple[list, list[str]]] = {}  # -> (values, their JSON texts)

    def encode(self, history: History) -> str:
        return f'{{"recent": {self._series("recent", history.recent)}, "coarse": {self._series("coarse", history.coarse)}}}'

    def _series(self, name: str, series: Series) -> str:
        old_t = self._columns.get((name, "t"), ([], []))[0]
        dropped = bisect.bisect_left(old_t, series.t[0]) if series.t else len(old_t)  # t only grows
        columns = ", ".join(f'"{col}": [{", ".join(self._column((name, col), getattr(series, col), dropped))}]'
                            for col in COLUMNS)
        return f'{{"resolution_s": {json.dumps(series.resolution_s)}, {columns}}}'

    def _column(self, key: tuple[str, str], values: list, dropped: int) -> list[str]:
        old, texts = self._columns.get(key, ([], []))
        kept = min(len(old) - dropped, len(values))
        while kept > 0 and old[dropped : dropped + kept] != values[:kept]:  # usually equal at once, or after 1
            kept -= 1
        fresh = values[kept:]
        if len(fresh) > 64:  # numbers and nulls hold no ", ": one C call for the lot, split
            texts = texts[dropped : dropped + kept] + json.dumps(fresh, allow_nan=False)[1:-1].split(", ")
        else:
            texts = texts[dropped : dropped + kept] + [json.dumps(v, allow_nan=False) for v in fresh]
        self._columns[key] = (list(values), texts)
        return texts


@functools.cache
def _static_files() -> dict[str, bytes]:
    """The schemas and the page published beside the dashboard (built once per process)."""
    files = {name: schema_text(schema).encode() for name, schema in json_schemas().items()}
    if PAGE.exists():
        files[PAGE.name] = PAGE.read_bytes()
    return files


def run_aggregator(
    agg: Aggregator, stop: Event, *, wall: Callable[[], datetime] = utc_now, once: bool = False
) -> None:
    """Tick every ``tick_s`` seconds until ``stop`` is set."""
    last_status = None
    while not stop.is_set():
        started = time.monotonic()
        dash = agg.tick(wall())
        status = (dash.status, dash.counts.fresh, dash.counts.stale, dash.counts.rejected)
        if status != last_status:
            log.info("%s (fresh %d, stale %d, rejected %d)", dash.message, *status[1:])
            last_status = status
        if once:
            return
        stop.wait(max(0.0, agg.settings.tick_s - (time.monotonic() - started)))


def load_members_status(paths: Paths) -> dict:
    return json.loads(paths.members_status_file.read_text())
