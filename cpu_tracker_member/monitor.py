"""The member's side of the private alerts: Algorithms 1 and 3 of ``shared/safezone.py`` over SyftBox files.

Once per window (``MemberMonitors.step``, called by the member's loop with the window's raw mean), for each monitor
the aggregator publishes in ``public/cpu_tracker/monitors.json``:

- the local vector from the last K raw window means (kept in memory, seeded from ``raw.jsonl`` at start);
- collecting: send a noisy vector for the epoch (once per epoch, at most b + 1 in the monitor's lifetime);
- monitoring: with the safe zone the aggregator wrote for this member alone
  (``datasites/<aggregator>/app_data/cpu_tracker_alerts/<me>/zones.json``), open the zone once (draw its noisy
  radius; at most b zones) and check it every window with one draw of the exponential mechanism; on leaving it,
  raise the breach flag and send the next epoch's vector at once (it saves the violation round a window).

Accounting (``shared/ledger.py``): every spend is admitted by the ledger, fsynced, *before* its noise is drawn and
anything is written: ``safezone_vector`` (epsilon / 3(b + 1), on the span of the sliding window it summarises) and
``safezone_zone`` (2 epsilon / 3b for the radius and every check of the zone, on the span from the start of its
reference window to the monitor's end, since the zone's checks may go on until then). The monitor's epsilon is for
one window mean (``interval_s`` seconds of activity); one *second* moves a window mean by at most 1 / n of that
(n = the window's whole seconds), so the ledger, whose unit is one second, is charged epsilon / n. The member keeps
its own count and never sends more than b + 1 vectors nor opens more than b zones per monitor, whatever the
aggregator asks, so it never overspends a monitor's lifetime epsilon; the ledger's rolling budgets bound the rest.

Outputs: ``datasites/<me>/app_data/cpu_tracker/monitor.json`` (beside the report, readable by the aggregator only);
the raw references and noisy radii stay in ``private/cpu_tracker/member/monitors.json`` (never synced). A file that
cannot be read or is not valid makes the member silent for what it concerns, said once in the log; nothing else
stops.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from datetime import datetime, timedelta

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from shared import safezone as sz
from shared.atomic import PRIVATE, atomic_write_bytes, read_regular
from shared.ledger import BudgetExceeded, LedgerCorrupt, Spend
from shared.permissions import parent_grant_problem
from shared.schema import MonitorDefinition, MonitorSignal, MonitorSignalsFile, MonitorsFile, SafeZone, SafeZonesFile

log = logging.getLogger("cpu_tracker.member")
MAX_WINDOWS = 2000  # the most window means a monitor may average (raw.jsonl keeps as many)
MAX_FILE_BYTES = 1 << 20


class Track(BaseModel):
    """What this member did for one monitor (private: holds raw vectors)."""

    model_config = ConfigDict(extra="ignore")

    generation: str
    vectors: int = 0
    zones: int = 0
    refs: dict[int, list[float]] = Field(default_factory=dict, description="Raw vector at each epoch's vector.")
    ref_at: dict[int, AwareDatetime] = Field(default_factory=dict)
    vector_epoch: int | None = None
    vector: list[float] | None = None
    zone_epoch: int | None = None
    noisy_radius: float | None = None
    breach_epoch: int | None = None


class Tracks(BaseModel):
    tracks: dict[str, Track] = Field(default_factory=dict)


class MemberMonitors:
    def __init__(self, member, *, random_state=None):
        self.member = member
        self.paths, self.settings, self.problems = member.paths, member.settings, member.problems
        self.random_state = random_state  # tests only: None draws from the system's cryptographic RNG
        self.windows: deque[float] = deque(_raw_means(self.paths.raw_file), maxlen=MAX_WINDOWS)
        self.tracks = self._load()
        self._written: list[MonitorSignal] | None = None

    def _load(self) -> dict[str, Track]:
        try:
            return Tracks.model_validate_json(self.paths.member_monitor_state_file.read_bytes()).tracks
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, ValidationError) as e:
            self.problems.report("monitor-state", f"the alerts' private state {self.paths.member_monitor_state_file} "
                                 f"is unreadable ({e}); the monitors are joined again (the ledger still holds every "
                                 "spend)", logging.ERROR)
            return {}

    # -- one window -------------------------------------------------------------------------------------
    def step(self, raw_mean: float, end: datetime) -> None:
        """Take part in every monitor for the window that just ended. Never raises: the releases go on."""
        self.windows.append(min(max(float(raw_mean), 0.0), 100.0))
        s = self.settings
        if not s.join_monitors or s.aggregator is None:
            return
        try:
            self._step(end)
            self.problems.clear("monitor-error", "the private alerts work again")
        except Exception as e:  # noqa: BLE001  the boundary: a bug here must not stop the releases
            if "monitor-error" not in self.problems.active:
                log.exception("private alerts failed this window (releases go on): %s", e)
            self.problems.active["monitor-error"] = str(e)

    def _step(self, end: datetime) -> None:
        defs = self._definitions()
        if defs is None:
            return
        zones: dict[str, SafeZone] | None = None
        why: str | None = None
        changed = False
        for d in defs:
            spec = self._spec(d)
            if spec is None:
                continue
            track = self.tracks.get(d.monitor)
            if track is None or track.generation != d.generation:
                track = self.tracks[d.monitor] = Track(generation=d.generation)
                changed = True
            if d.phase == "exhausted" or end >= d.ends_at or len(self.windows) < spec.window:
                continue
            v = sz.local_vector(spec.kind, list(self.windows)[-spec.window:])
            if d.phase == "collecting" and track.vector_epoch != d.epoch:
                changed |= self._send_vector(spec, d, track, v, end, d.epoch)
            elif d.phase == "monitoring" and track.breach_epoch != d.epoch and d.epoch in track.refs:
                if zones is None:
                    zones, why = self._zones()
                changed |= self._check(spec, d, track, v, end, why or zones.get(d.monitor))
        # a track is kept while its monitor is gone (it may come back: the track is what stops the member from
        # spending a generation's budget twice); a new generation of the same name replaces it (a new lifetime,
        # which the ledger's rolling budgets bound)
        if changed:
            atomic_write_bytes(self.paths.member_monitor_state_file, Tracks(tracks=self.tracks).model_dump_json()
                               .encode() + b"\n", mode=PRIVATE)
        self._write_signals(end)

    # -- Algorithm 1: a noisy vector ------------------------------------------------------------------
    def _send_vector(self, spec: sz.MonitorSpec, d: MonitorDefinition, track: Track, v, end: datetime,
                     epoch: int) -> bool:
        split = sz.split(spec)
        acct = sz.Account(track.vectors, track.zones)
        if not acct.can_send_vector(split):
            self.problems.report(f"monitor:{spec.name}", f"monitor {spec.name}: its b + 1 = {spec.violations + 1} "
                                 "noisy vectors are spent; no more are sent, whatever the aggregator asks")
            return False
        start = end - timedelta(seconds=spec.window * self.settings.interval_s)
        if not self._charge(spec, "safezone_vector", split.vector, start, end, end):
            return False
        l1, _ = sz.sensitivity(spec.kind, spec.window)
        track.vector = sz.draw_vector(v, epsilon=split.vector, l1=l1, random_state=self.random_state)
        track.vectors += 1
        track.vector_epoch = epoch
        track.refs = {**{k: r for k, r in track.refs.items() if k >= epoch - 1}, epoch: [float(x) for x in v]}
        track.ref_at = {**{k: t for k, t in track.ref_at.items() if k >= epoch - 1}, epoch: end}
        return True

    # -- Algorithm 3: the zone and its check ----------------------------------------------------------
    def _check(self, spec: sz.MonitorSpec, d: MonitorDefinition, track: Track, v, end: datetime,
               zone: SafeZone | None | str) -> bool:
        key = f"zone:{spec.name}"
        if isinstance(zone, str):
            self.problems.report(key, f"monitor {spec.name}: {zone}; staying silent for this monitor until it can "
                                 "be read")
            return False
        if zone is None or zone.generation != d.generation or zone.epoch != d.epoch:
            return False  # not synced yet, or not part of this epoch (no vector sent for it): silent
        if len(zone.offset) != sz.dims(spec.kind):
            self.problems.report(key, f"monitor {spec.name}: the safe zone has {len(zone.offset)} offset values, "
                                 f"expected {sz.dims(spec.kind)}; staying silent for this monitor")
            return False
        self.problems.clear(key, f"monitor {spec.name}: the safe zone is readable again")
        split = sz.split(spec)
        _, l2 = sz.sensitivity(spec.kind, spec.window)
        changed = False
        if track.zone_epoch != d.epoch:
            if not sz.Account(track.vectors, track.zones).can_open_zone(split):
                self.problems.report(f"monitor:{spec.name}", f"monitor {spec.name}: its b = {spec.violations} safe "
                                     "zones are spent; no more checks, whatever the aggregator asks")
                return False
            ref_at = track.ref_at.get(d.epoch, end)
            start = ref_at - timedelta(seconds=spec.window * self.settings.interval_s)
            if not self._charge(spec, "safezone_zone", split.zone, start, max(d.ends_at, end + timedelta(seconds=1)),
                                end):
                return False
            track.noisy_radius = sz.draw_radius(zone.radius, epsilon=split.radius, l2=l2,
                                                random_state=self.random_state)
            track.zone_epoch, track.zones, changed = d.epoch, track.zones + 1, True
        dist = sz.drift_distance(v, track.refs[d.epoch], zone.offset)
        if sz.draw_outside(dist, track.noisy_radius, epsilon=split.check, l2=l2, random_state=self.random_state):
            track.breach_epoch = d.epoch
            log.debug("monitor %s: left the safe zone of epoch %d (P(outside) was %.3g)", spec.name, d.epoch,
                      sz.outside_probability(dist, track.noisy_radius, epsilon=split.check, l2=l2))
            if sz.Account(track.vectors, track.zones).can_send_vector(split):  # the violation round's vector now
                self._send_vector(spec, d, track, v, end, d.epoch + 1)
            changed = True
        return changed

    def _charge(self, spec: sz.MonitorSpec, mechanism: str, epsilon: float, start: datetime, stop: datetime,
                now: datetime) -> bool:
        """Record the spend in the ledger (fsynced) before anything depends on it; False (logged once) if refused."""
        ledger = self.member.ledger()
        if ledger is None:
            return False
        n = self.settings.samples_per_window
        try:
            ledger.admit(Spend(released_at=now, window_start=start, window_end=stop, epsilon=epsilon / n,
                               mechanism=mechanism, unit="cpu_second", n_samples=n))
        except BudgetExceeded as e:
            self.problems.report(f"monitor-budget:{spec.name}", f"monitor {spec.name}: {e}; staying silent for it")
            return False
        except (LedgerCorrupt, OSError) as e:
            self.problems.report(f"monitor-budget:{spec.name}", f"monitor {spec.name}: cannot record its spend in "
                                 f"the ledger ({e}); staying silent for it")
            return False
        self.problems.clear(f"monitor-budget:{spec.name}", f"monitor {spec.name}: budget available again")
        return True

    # -- files ----------------------------------------------------------------------------------------
    def _definitions(self) -> list[MonitorDefinition] | None:
        path = self.paths.monitors_file(self.settings.aggregator)
        try:
            data = read_regular(path, MAX_FILE_BYTES + 1)  # never blocks, refuses a FIFO or symlink
        except FileNotFoundError:
            return None  # no monitor (or not synced yet): nothing to do, and every track is kept
        except OSError as e:
            self.problems.report("monitors-file", f"cannot read the aggregator's monitors {path} ({e}); no alert is "
                                 "checked until it can be read")
            return None
        try:
            defs = MonitorsFile.model_validate_json(data).monitors
        except ValidationError as e:
            self.problems.report("monitors-file", f"the aggregator's monitors file {path} is refused (not a "
                                 f"MonitorsFile: {e.errors()[0]['msg']}); no alert is checked until it is valid")
            return None
        self.problems.clear("monitors-file", "the aggregator's monitors file is valid again")
        return defs

    def _spec(self, d: MonitorDefinition) -> sz.MonitorSpec | None:
        try:
            spec = sz.MonitorSpec(name=d.monitor, kind=d.kind, threshold=d.threshold, margin=d.margin,
                                  window=d.window, epsilon=d.epsilon, violations=d.violations)
        except ValidationError as e:
            self.problems.report(f"monitor-def:{d.monitor}", f"the aggregator's monitor {d.monitor!r} is refused: "
                                 f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']}; not taking part in it")
            return None
        if spec.window > MAX_WINDOWS:
            self.problems.report(f"monitor-def:{d.monitor}", f"the aggregator's monitor {d.monitor!r} averages "
                                 f"{spec.window} windows, more than the {MAX_WINDOWS} kept; not taking part in it")
            return None
        return spec

    def _zones(self) -> tuple[dict[str, SafeZone], str | None]:
        """This member's zones by monitor, or why they cannot be used (then for every monitor)."""
        path = self.paths.zones_file(self.paths.email, self.settings.aggregator)
        try:
            data = read_regular(path, MAX_FILE_BYTES + 1)  # never blocks, refuses a FIFO or symlink
        except FileNotFoundError:
            return {}, None
        except OSError as e:
            return {}, f"cannot read my safe zone {path} ({e.strerror or e})"
        try:
            zf = SafeZonesFile.model_validate_json(data)
        except ValidationError as e:
            err = e.errors()[0]
            return {}, f"my safe-zone file {path} is refused (not a SafeZonesFile: {err['loc']}: {err['msg']})"
        if zf.member != self.paths.email:
            return {}, f"my safe-zone file {path} names another member ({zf.member!r})"
        return {z.monitor: z for z in zf.zones}, None

    def _write_signals(self, end: datetime) -> None:
        signals = [MonitorSignal(monitor=name, generation=t.generation, vector_epoch=t.vector_epoch, vector=t.vector,
                                 breach_epoch=t.breach_epoch) for name, t in sorted(self.tracks.items())]
        path = self.paths.monitor_signals_file()
        if signals == self._written and path.exists():
            return
        if not signals and not path.exists():
            self._written = signals
            return
        problem = parent_grant_problem(self.paths.my_datasite, path, [self.paths.email, self.settings.aggregator])
        if problem is not None or not (path.parent / "syftperm.yaml").exists():
            return  # the member's publish() withdraws and says why; nothing goes where others could read it
        try:
            atomic_write_bytes(path, MonitorSignalsFile(created_at=end, signals=signals).model_dump_json().encode()
                               + b"\n")
            self._written = signals
            self.problems.clear("monitor-write", "the monitor signals are written again")
        except OSError as e:
            self.problems.report("monitor-write", f"cannot write {path}: {e}. Free disk space.")


def _raw_means(path) -> list[float]:
    """The last raw window means the member kept (``raw.jsonl``), oldest first; none if it cannot be read."""
    try:
        lines = path.read_text().splitlines()[-MAX_WINDOWS:]
    except (OSError, ValueError):
        return []
    out = []
    for line in lines:
        try:
            out.append(float(json.loads(line)["raw_mean"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out
