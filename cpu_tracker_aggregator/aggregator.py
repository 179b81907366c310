"""The aggregator's I/O: one tick reads the members' reports and writes the dashboard and private status."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from threading import Event
from typing import Callable

from pydantic import ValidationError

from cpu_tracker_aggregator.collect import Collector, MemberOutcome
from cpu_tracker_aggregator.dashboard import build_dashboard, empty_history
from shared.atomic import atomic_write_json, write_if_changed
from shared.logs import Problems
from shared.paths import Paths
from shared.permissions import ensure_permissions
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
        outcomes = self.collector.collect(now)
        dashboard = build_dashboard(outcomes, self.history, now, self.settings)
        self.history = dashboard.history
        self._publish(dashboard)
        self._write_private(outcomes, now)
        return dashboard

    def _publish(self, dashboard: Dashboard) -> None:
        folder = self.paths.public_dir()
        try:
            ensure_permissions(folder, self.paths.email, ["*"])
            for name, schema in json_schemas().items():
                write_if_changed(folder / name, schema_text(schema).encode())
            if PAGE.exists():
                write_if_changed(folder / PAGE.name, PAGE.read_bytes())
            atomic_write_json(self.paths.dashboard_file, dashboard.model_dump(mode="json"), indent=None)
            self.problems.clear("publish", "dashboard published again")
        except OSError as e:
            self.problems.report("publish", f"cannot publish to {folder}: {e}. Check disk space and permissions.")

    def _write_private(self, outcomes: list[MemberOutcome], now: datetime) -> None:
        members = {
            o.member: {
                "status": o.status,
                "reason": o.reason or None,
                "detail": o.detail or None,
                "window_end": o.accepted.window_end.isoformat() if o.accepted else None,
            }
            for o in outcomes
        }
        try:
            atomic_write_json(self.paths.members_status_file, {"generated_at": now.isoformat(), "members": members})
            atomic_write_json(self.paths.history_file, self.history.model_dump(mode="json"), indent=None)
            self.problems.clear("private", "private status written again")
        except OSError as e:
            self.problems.report("private", f"cannot write {self.paths.private}: {e}. History may be lost on restart.")


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
