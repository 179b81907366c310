"""The aggregator's I/O: one tick reads the members' reports and writes the dashboard and private status."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from threading import Event
from typing import Callable

from pydantic import ValidationError

from cpu_tracker_aggregator.collect import Collector, Snapshot, members_json_chunks
from cpu_tracker_aggregator.dashboard import build_dashboard, empty_history
from shared.atomic import atomic_write_bytes, atomic_write_chunks, write_if_changed
from shared.logs import Hourly, Problems
from shared.paths import Paths
from shared.permissions import ensure_permissions
from shared.runner import Role
from shared.schema import Dashboard, History, json_schemas, schema_text, utc_now
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
        self._write_private(snapshot, now)  # first: a crash must never take back a published point
        self._publish(dashboard)
        return dashboard

    def _publish(self, dashboard: Dashboard) -> None:
        folder = self.paths.public_dir()
        try:
            fixed = ensure_permissions(folder, self.paths.email, ["*"])
            if fixed and self._published_once:  # the first tick writes them silently
                log.warning("repaired %s in %s (missing or changed)", ", ".join(fixed), folder)
            self._published_once = True
            for name, data in _static_files().items():
                write_if_changed(folder / name, data)
            # rewritten every tick: after a crash the old file or the new one is there, which is all that matters,
            # so the folder is not fsynced (the file is)
            atomic_write_bytes(self.paths.dashboard_file, dashboard.model_dump_json().encode() + b"\n", durable=False)
            self.problems.clear("publish", "dashboard published again")
        except OSError as e:
            self.problems.report("publish", f"cannot publish to {folder}: {e}. Check disk space and permissions.")

    def _write_private(self, snapshot: Snapshot, now: datetime) -> None:
        """History every tick; the per-member status only when it changed (writing it is O(members))."""
        if snapshot.members_lines is not None:
            self._members_pending = snapshot
        try:
            if self._members_pending is not None:
                # derived state, rewritten by the next change and at every start: no fsync
                atomic_write_chunks(self.paths.members_status_file, members_json_chunks(self._members_pending, now),
                                    durable=False, fsync=False)
                self._members_pending = None
            # durable: it must outlive the dashboard
            atomic_write_bytes(self.paths.history_file, self.history.model_dump_json().encode() + b"\n")
            self.problems.clear("private", "private status written again")
        except OSError as e:  # the per-member status is retried next tick, even if nothing changes
            self.problems.report("private", f"cannot write {self.paths.private}: {e}. History may be lost on restart.")


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
    last_status = last_counts = None
    summary = Hourly(log, hourly_line)
    while not stop.is_set():
        started = time.monotonic()
        now = wall()
        dash = agg.tick(now)
        counts = (dash.counts.fresh, dash.counts.stale, dash.counts.rejected)
        if (dash.status, counts) != (last_status, last_counts):  # the status at INFO, a change of counts at DEBUG
            log.log(logging.INFO if dash.status != last_status or once else logging.DEBUG,
                    "%s (fresh %d, stale %d, rejected %d)", dash.message, *counts)
            last_status, last_counts = dash.status, counts
        summary.add(now.timestamp(), ticks=1, figures=dash.estimate is not None, fresh=counts[0],
                    rejected=counts[2])
        if once:
            return
        stop.wait(max(0.0, agg.settings.tick_s - (time.monotonic() - started)))


def hourly_line(totals: dict[str, float], now: float) -> str:
    ticks = max(totals.get("ticks", 0), 1)
    return (f"last hour: {totals.get('figures', 0):.0f} of {ticks:.0f} ticks published a figure, "
            f"{totals.get('fresh', 0) / ticks:.1f} fresh members and {totals.get('rejected', 0) / ticks:.1f} "
            "rejected reports on average")


def run(paths: Paths, settings: Settings, stop: Event, *, once: bool = False) -> None:
    """The aggregator role as the runner starts it: the real clock."""
    run_aggregator(Aggregator(paths, settings, Problems(log)), stop, once=once)


ROLE = Role("aggregator", run)
