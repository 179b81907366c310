"""The aggregator's I/O: one tick reads the members' reports and writes the dashboard and private status."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from threading import Event
from typing import Callable

import numpy as np
from pydantic import ValidationError

from cpu_tracker_aggregator.alerts import Alerts
from cpu_tracker_aggregator.features import Feature, SecureRounds
from cpu_tracker_aggregator.roster import Roster, Snapshot, members_json_chunks
from cpu_tracker_aggregator.dashboard import build_dashboard, empty_history, secure_is_recent
from cpu_tracker_aggregator.metrics import Metrics
from cpu_tracker_aggregator.publish import Publisher
from shared.atomic import PRIVATE, atomic_write_bytes, atomic_write_chunks, write_if_changed
from shared.logs import Hourly, Problems
from shared.paths import PAGE_FILE, Paths
from shared.permissions import ensure_permissions, exposure_sentence, guard_for, withhold
from shared.host.runner import Role
from shared.wire.catalog import json_schemas, schema_text
from shared.wire.schema import Dashboard, History, utc_now
from shared.settings import Settings

log = logging.getLogger("cpu_tracker.aggregator")
PAGE = Path(__file__).parent / "page" / PAGE_FILE
FEATURES = (Alerts, SecureRounds)  # the aggregator's features (features.py), in the order they tick and show


@dataclass
class Aggregator:
    paths: Paths
    settings: Settings
    problems: Problems
    metrics_port: int | None = None  # also serve the metrics on 127.0.0.1:<port>
    roster: Roster = field(init=False)
    history: History = field(init=False)
    _members_pending: Snapshot | None = field(init=False, default=None)
    _published_once: bool = field(init=False, default=False)
    _last: Dashboard | None = field(init=False, default=None)
    _last_snapshot: Snapshot | None = field(init=False, default=None)
    _history_unsaved: bool = field(init=False, default=False)
    publisher: Publisher = field(init=False)
    features: dict[str, Feature] = field(init=False)  # by name, in the order of FEATURES

    def __post_init__(self) -> None:
        self.features = {f.name: f for f in (make(self.paths, self.settings, self.problems) for make in FEATURES)}
        self.roster = Roster(self.paths, self.settings)
        self.history = self._load_history()
        self.publisher = Publisher(self.paths.public_dir())
        try:
            self.metrics = Metrics(self.paths.metrics_file, self.metrics_port, self._feature_metrics())
        except OSError as e:  # the port is taken (another datasite on this machine?): the textfile still works
            self.problems.report("metrics-port", f"cannot serve metrics on 127.0.0.1:{self.metrics_port} ({e}); "
                                 "set another metrics_port. The textfile is still written.")
            self.metrics = Metrics(self.paths.metrics_file, features=self._feature_metrics())

    def _feature_metrics(self) -> list:
        return [f.metrics for f in self.features.values()]

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
        """Read every report and, if anything changed since the last tick, add a history point and publish what
        changed. A tick that changed nothing writes no file (it only puts back files deleted behind its back).
        Problems are logged once; the tick always completes."""
        snapshot = self.roster.tick(now)
        self._withhold_exposed()
        features_changed = self._tick_features(now)
        lead_lapsed = (self._last is not None and self._last.lead == "secure"  # its round is no longer recent
                       and not secure_is_recent(self._last.secure, now, self.settings))
        changed = (features_changed or self._last is None or snapshot.members_lines is not None or lead_lapsed
                   or not _same_figure(snapshot, self._last_snapshot)
                   # a heartbeat: a live aggregator's points are never more than stale_after_s apart
                   or (now - self._last.generated_at).total_seconds() >= self.settings.stale_after_s)
        self._last_snapshot = snapshot
        if changed:
            inputs = {k: v for f in self.features.values() for k, v in f.inputs().items()}
            dashboard = build_dashboard(snapshot, self.history, now, self.settings, **inputs)
            for f in self.features.values():
                dashboard = f.attach(dashboard)
            self.history = dashboard.history
        else:  # no report, status or reason changed since a tick that published everything
            dashboard = self._last
        self._write_private(snapshot, now, changed)  # first: a crash must never take back a published point
        published = self._publish(dashboard, int(now.timestamp()), changed)
        self._last = dashboard if published else None  # a failed write is retried at the next tick
        try:
            self.metrics.update(dashboard, changed=changed)
            self.problems.clear("metrics", "metrics textfile written again")
        except OSError as e:
            self.problems.report("metrics", f"cannot write {self.paths.metrics_file}: {e}. Check disk space.")
        return dashboard

    def _withhold_exposed(self) -> None:
        """Every tick, before anything is written: the folders the features guard, that only some may read (the
        epoch's cohort, each member's inbox and safe zones), are checked again, since a file there is written only
        when it changes; an exposed one's file is withdrawn, said once per kind (shared/permissions.py)."""
        guard = guard_for(self.paths.my_datasite, self.paths.sync_state_file)
        guard.refresh()
        for f in self.features.values():
            for g in f.guarded():
                found = [why for folder, readers, files in g.folders if any(map(os.path.lexists, files))
                         and (why := withhold(guard, folder, readers, files))]
                if found:
                    self.problems.report(g.key, exposure_sentence(found, g.what), logging.ERROR)

    def _tick_features(self, now: datetime) -> bool:
        """Every feature's tick; True when what one adds to the figure changed. A failure is logged once (a bug with
        its traceback) and the other features and the local figure carry on."""
        changed = False
        for f in self.features.values():
            try:
                changed |= f.tick(now)
                self.problems.clear(f.name, f"{f.what} running again")
            except (OSError, ValueError) as e:
                self.problems.report(f.name, f"{f.what} stopped by an error: {e}", logging.ERROR)
            except Exception as e:  # noqa: BLE001  the boundary: a bug in one feature must not stop the figure
                if f.name not in self.problems.active:
                    log.exception("%s failed this tick (the network figure goes on): %s", f.what, e)
                self.problems.active[f.name] = str(e)
        return changed

    def _publish(self, dashboard: Dashboard, now: int, changed: bool) -> bool:
        """Write the public folder (permissions, static files, what changed); False (logged once) on failure."""
        folder = self.paths.public_dir()
        try:
            fixed = ensure_permissions(folder, self.paths.email, ["*"])
            if fixed and self._published_once:  # the first tick writes them silently
                log.warning("repaired %s in %s (missing or changed)", ", ".join(fixed), folder)
            self._published_once = True
            for name, data in _static_files().items():
                write_if_changed(folder / name, data)
            if changed:
                self.publisher.publish(dashboard, now)
            self.publisher.repair()
            self.problems.clear("publish", "dashboard published again")
            return True
        except OSError as e:
            self.problems.report("publish", f"cannot publish to {folder}: {e}. Check disk space and permissions.")
            return False

    def _write_private(self, snapshot: Snapshot, now: datetime, changed: bool) -> None:
        """History when it changed (or went missing); the per-member status only when it changed (writing it is
        O(members)). Both are the operator's alone: mode 0600 in a 0700 folder, whatever the umask."""
        if snapshot.members_lines is not None:
            self._members_pending = snapshot
        try:  # first and on its own: a published point must be saved whatever happens to members.json
            if changed or self._history_unsaved or not self.paths.history_file.exists():  # durable
                atomic_write_bytes(self.paths.history_file, self.history.model_dump_json().encode() + b"\n",
                                   mode=PRIVATE)
            self._history_unsaved = False
            self.problems.clear("history", "history saved again")
        except OSError as e:  # retried at every tick until it works
            self._history_unsaved = True
            self.problems.report("history", f"cannot write {self.paths.history_file}: {e}. History may be lost on "
                                 "restart; free disk space.")
        if self._members_pending is None:
            return
        try:  # derived state, rewritten by the next change and at every start: no fsync
            atomic_write_chunks(self.paths.members_status_file, members_json_chunks(self._members_pending, now),
                                durable=False, fsync=False, mode=PRIVATE)
            self._members_pending = None
            self.problems.clear("private", "private status written again")
        except OSError as e:  # retried at the next tick, which does not count as a change for that
            self.problems.report("private", f"cannot write {self.paths.members_status_file}: {e}.")


def _port(text: str | None) -> int | None:
    """A TCP port given by the client, or None (logged once) when it is not one."""
    if not text:
        return None
    if text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    log.warning("SYFTBOX_APP_PORT=%r is not a TCP port: the metrics endpoint uses metrics_port instead", text)
    return None


def _same_figure(a: Snapshot, b: Snapshot | None) -> bool:
    """True when two ticks' snapshots give the same figure and counts (no report's value, status or reason moved)."""
    if b is None or a.counts != b.counts or a.rejected_by_reason != b.rejected_by_reason:
        return False
    fa, fb = a.fresh, b.fresh
    return (fa.mechanisms == fb.mechanisms and np.array_equal(fa.values, fb.values)
            and np.array_equal(fa.noise_scales, fb.noise_scales) and np.array_equal(fa.epsilons, fb.epsilons))


@functools.cache
def _static_files() -> dict[str, bytes]:
    """The schemas and the page published beside the dashboard (built once per process)."""
    files = {name: schema_text(schema).encode() for name, schema in json_schemas().items()}
    if PAGE.exists():
        files[PAGE_FILE] = PAGE.read_bytes()
    return files


def run_aggregator(
    agg: Aggregator, stop: Event, *, wall: Callable[[], datetime] = utc_now, once: bool = False
) -> None:
    """Tick every ``tick_s`` seconds until ``stop`` is set."""
    last_status = last_counts = None
    summary = Hourly(log, hourly_line)
    try:
        while not stop.is_set():
            started = time.monotonic()
            now = wall()
            dash = agg.tick(now)
            counts = (dash.counts.fresh, dash.counts.stale, dash.counts.rejected, dash.counts.legacy)
            if (dash.status, counts) != (last_status, last_counts):  # the status at INFO, a change of counts at DEBUG
                log.log(logging.INFO if dash.status != last_status or once else logging.DEBUG,
                        "%s (fresh %d, stale %d, rejected %d, legacy %d)", dash.message, *counts)
                last_status, last_counts = dash.status, counts
            summary.add(now.timestamp(), ticks=1, figures=dash.estimate is not None, fresh=counts[0],
                        rejected=counts[2])
            if once:
                return
            stop.wait(max(0.0, agg.settings.tick_s - (time.monotonic() - started)))
    finally:
        agg.metrics.close()


def hourly_line(totals: dict[str, float], now: float) -> str:
    ticks = max(totals.get("ticks", 0), 1)
    return (f"last hour: {totals.get('figures', 0):.0f} of {ticks:.0f} ticks published a figure, "
            f"{totals.get('fresh', 0) / ticks:.1f} fresh members and {totals.get('rejected', 0) / ticks:.1f} "
            "rejected reports on average")


def run(paths: Paths, settings: Settings, stop: Event, *, once: bool = False) -> None:
    """The aggregator role as the runner starts it: the real clock; the metrics port the client gives the app
    (the Go client's SYFTBOX_APP_PORT), else the ``metrics_port`` setting."""
    port = _port(os.environ.get("SYFTBOX_APP_PORT")) or settings.metrics_port
    run_aggregator(Aggregator(paths, settings, Problems(log), metrics_port=port), stop, once=once)


ROLE = Role("aggregator", run)
