"""The member's side of the private alerts: Algorithms 1 and 3 of ``shared/privacy/safezone.py`` over SyftBox files.

Once per window (``MemberMonitors.step``, called by the member's loop with the window's raw mean and its times), for
each monitor the aggregator publishes in ``public/cpu_tracker/monitors.json``:

- the local vector from the last K window means, kept with their times (in memory, seeded at start from
  ``raw.jsonl``), used only when they follow each other with at most one window of gaps in all and end with the
  window that just ended (``safezone.usable_windows``): never stale windows, whatever the files hold;
- collecting: send a noisy vector for the epoch (once per epoch, at most b + 1 in the generation's lifetime);
- monitoring: with the safe zone the aggregator wrote for this member alone
  (``datasites/<aggregator>/app_data/cpu_tracker_alerts/<me>/zones.json``), open the zone once (draw its noisy
  radius; at most b zones) and check it every window with one draw of the exponential mechanism; on leaving it,
  raise the breach flag and send the next epoch's vector at once (it saves the violation round a window).

Pinned spending. Everything that decides what the member spends for a monitor (kind, threshold, margin, K, epsilon,
b, start and end, and the whole seconds of its windows) is fixed for each (name, generation) at its first spend and
kept in the private state; a later change makes the member silent for that generation for good, said once. A new
generation is a new monitor: all of them together are bounded by the member's own cap (``monitor_budgets``), which
the ledger checks under its lock with every spend (``safezone.cap_check``), so an aggregator that loses its state or
invents a generation each time the member is exhausted cannot make it spend past the cap.

Accounting (``shared/privacy/ledger.py``): the generation's count is recorded durably first (a crash never lets it spend
twice), then the spend is admitted by the ledger, fsynced, *before* its noise is drawn: ``safezone_vector``
(epsilon / 3(b + 1)) on the true span of the K windows it summarises; ``safezone_zone`` (2 epsilon / 3b) first on
its reference windows and the window of its first check, then extended by one line per window its checks go on to
use, so a zone's lines cover exactly the span it uses (the lines share an id: one sparse-vector instance, counted
once by the cap). The monitor's epsilon is for one window mean; one *second* moves a window mean of n whole seconds
by at most 1 / n of that, so the ledger (one second) is charged epsilon / n. In secure mode with the ``cpu_day``
unit, the day's composition (``secure.day_check``) also holds every monitor spend.

Outputs: ``datasites/<me>/app_data/cpu_tracker/monitor.json`` (beside the report, readable by the aggregator only);
the raw references, noisy radii and pins stay in ``private/cpu_tracker/member/monitors.json`` (never synced). A file
that cannot be read or is not valid makes the member silent for what it concerns, said once in the log; nothing
else stops.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Callable, Literal

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from shared.privacy import safezone as sz
from shared.atomic import PRIVATE, atomic_write_bytes, read_regular
from shared.privacy.ledger import BudgetExceeded, Charge, Spend
from shared.paths import SYFTPERM_FILE
from shared.privacy import DAY_UNIT, SECOND_UNIT, WINDOW_UNIT, clip_cpu
from shared.wire.schema import (MonitorDefinition, MonitorSignal, MonitorSignalsFile, MonitorsFile, SafeZone,
                                SafeZonesFile)
from shared.settings import Settings

log = logging.getLogger("cpu_tracker.member")
MAX_WINDOWS = 2000  # the most window means a monitor may average (raw.jsonl keeps as many)
MAX_FILE_BYTES = 1 << 20
MAX_TRACKS = 256  # generations remembered (dropping one is safe: the cap in the ledger bounds a return)
MAX_GENERATION_CHARS = 100
MAX_REFERENCE_AGE_S = 3600.0  # a zone is opened only this soon after the vector it is drawn around


class Pin(BaseModel):
    """What decides what the member spends for one generation of a monitor, fixed at its first spend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mean", "imbalance"]
    threshold: float
    margin: float
    window: int
    epsilon: float
    violations: int
    started_at: AwareDatetime
    ends_at: AwareDatetime
    seconds: int = Field(ge=1, description="Whole seconds of each window mean used: the ledger is charged epsilon / "
                         "seconds per second of activity, and shorter windows are never used.")


def pin_of(d: MonitorDefinition, seconds: int) -> Pin:
    return Pin(kind=d.kind, threshold=d.threshold, margin=d.margin, window=d.window, epsilon=d.epsilon,
               violations=d.violations, started_at=d.started_at, ends_at=d.ends_at, seconds=seconds)


def pin_change(pinned: Pin, now: Pin) -> str | None:
    """The fields of a generation's definition that changed since its first spend, in words (None: none)."""
    names = {"violations": "b (violations)", "window": "K (window)", "ends_at": "end (ends_at)"}
    changed = [f"{names.get(k, k)} {getattr(pinned, k)} -> {getattr(now, k)}"
               for k in Pin.model_fields if k != "seconds" and getattr(pinned, k) != getattr(now, k)]
    return ", ".join(changed) or None


class Track(BaseModel):
    """What this member did for one generation of one monitor (private: holds raw vectors)."""

    model_config = ConfigDict(extra="ignore")

    monitor: str = ""
    generation: str
    pin: Pin | None = None
    silent: str | None = Field(default=None, description="Why it takes no further part in this generation.")
    vectors: int = 0
    zones: int = 0
    refs: dict[int, list[float]] = Field(default_factory=dict, description="Raw vector at each epoch's vector.")
    ref_span: dict[int, tuple[AwareDatetime, AwareDatetime]] = Field(
        default_factory=dict, description="The span of the windows each reference summarises.")
    vector_epoch: int | None = None
    vector: list[float] | None = None
    zone_epoch: int | None = None
    zone_id: str | None = None
    covered_until: AwareDatetime | None = Field(default=None, description="The open zone's spends end here.")
    noisy_radius: float | None = None
    breach_epoch: int | None = None
    last_spend: AwareDatetime | None = None


class Tracks(BaseModel):
    version: Literal[2] = 2
    tracks: list[Track] = Field(default_factory=list)


class _OldTracks(BaseModel):  # before pins: one track per name
    tracks: dict[str, Track] = Field(default_factory=dict)


Key = tuple[str, str]  # (monitor, generation)


class MemberMonitors:
    def __init__(self, member, *, random_state=None):
        self.member = member
        self.paths, self.settings, self.problems = member.paths, member.settings, member.problems
        self.random_state = random_state  # tests only: None draws from the system's cryptographic RNG
        self.windows: deque[sz.WindowMean] = deque(_raw_windows(self.paths.raw_file), maxlen=MAX_WINDOWS)
        self.tracks: dict[Key, Track] = self._load()
        self.current: dict[str, Key] = {}  # name -> the generation the aggregator's file names now
        self._written: list[MonitorSignal] | None = None
        self._also = also_checks(self.settings)

    def _load(self) -> dict[Key, Track]:
        path = self.paths.member_monitor_state_file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            data, error = b"", e
        else:
            error = None
        try:
            return {(t.monitor, t.generation): t for t in Tracks.model_validate_json(data).tracks}
        except (ValueError, ValidationError) as e:
            error = error or e
        try:  # the state of a version that kept no pins: what it spent on is silent until its generation ends
            old = _OldTracks.model_validate_json(data).tracks
            why = "it spent on this generation before pins were kept"
            return {(n, t.generation): t.model_copy(update={"monitor": n, "silent": why if t.vectors or t.zones
                                                            else None}) for n, t in old.items()}
        except (ValueError, ValidationError):
            pass
        self.problems.report("monitor-state", f"the alerts' private state {path} is unreadable ({error}); the "
                             "monitors are joined again (the ledger still holds every spend, and monitor_budgets "
                             "bounds them all)", logging.ERROR)
        return {}

    def _save(self, *, durable: bool = False) -> None:
        data = Tracks(tracks=list(self.tracks.values())).model_dump_json().encode() + b"\n"
        atomic_write_bytes(self.paths.member_monitor_state_file, data, durable=durable, mode=PRIVATE)

    # -- one window -------------------------------------------------------------------------------------
    def step(self, raw_mean: float, start: datetime, end: datetime) -> None:
        """Take part in every monitor for the window [start, end) that just ended. Never raises: the releases go
        on."""
        self.windows.append(sz.WindowMean(start.timestamp(), end.timestamp(), clip_cpu(raw_mean)))
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
        self.current = {}
        for d in defs:
            if not self._valid(d):
                continue
            key = (d.monitor, d.generation)
            self.current[d.monitor] = key
            track = self.tracks.setdefault(key, Track(monitor=d.monitor, generation=d.generation))
            if track.silent is not None:
                continue
            if track.pin is not None and (change := pin_change(track.pin, pin_of(d, track.pin.seconds))):
                track.silent = (f"the aggregator changed it after this member's first spend ({change}); the member "
                                "takes no further part in this generation, whatever it says next")
                log.warning("monitor %s (generation %s): %s", d.monitor, d.generation, track.silent)
                changed = True
                continue
            pin = track.pin or pin_of(d, self.settings.samples_per_window)
            if d.phase == "exhausted" or end >= pin.ends_at:
                continue
            windows = sz.usable_windows(self.windows, pin.window, seconds=pin.seconds,
                                        interval_s=self.settings.interval_s)
            if windows is None or windows[-1].end != end.timestamp():
                continue  # fewer than K recent, following windows (after a start or a gap): wait for them
            v = sz.local_vector(pin.kind, [w.mean for w in windows])
            if d.phase == "collecting" and track.vector_epoch != d.epoch:
                changed |= self._send_vector(d, pin, track, v, windows, end, d.epoch)
            elif d.phase == "monitoring" and track.breach_epoch != d.epoch and d.epoch in track.refs:
                if zones is None:
                    zones, why = self._zones()
                changed |= self._check(d, pin, track, v, windows, end, why or zones.get(d.monitor))
        changed |= self._forget(end)
        if changed:
            self._save()
        self._write_signals(end)

    def _forget(self, now: datetime) -> bool:
        """Drop the generations that can spend no more (ended a day ago, or never spent on and no longer named),
        then the oldest beyond MAX_TRACKS. Safe: a generation that comes back is a new monitor under the cap."""
        live = set(self.current.values())
        keep = {k: t for k, t in self.tracks.items()
                if k in live or (t.pin is not None and t.pin.ends_at > now - timedelta(days=1))}
        if len(keep) > MAX_TRACKS:
            oldest = sorted((k for k in keep if k not in live), key=lambda k: keep[k].last_spend or _EPOCH0)
            for k in oldest[:len(keep) - MAX_TRACKS]:
                del keep[k]
        dropped = len(keep) != len(self.tracks)
        self.tracks = keep
        return dropped

    # -- spending -----------------------------------------------------------------------------------------
    def _spend(self, track: Track, pin: Pin, what: str, instance: str, epsilon: float, start: datetime,
               stop: datetime, now: datetime, count: str | None) -> bool:
        """Pin the generation and count the spend (saved durably first, so a crash can only waste it), then record
        it in the ledger (fsynced) before anything depends on it. False (logged once, the count undone) if refused."""
        ledger = self.member.ledger()
        if ledger is None:
            return False
        key = f"monitor-budget:{track.monitor}"
        spend = Spend(released_at=now, window_start=start, window_end=stop, epsilon=epsilon / pin.seconds,
                      mechanism=sz.spend_mechanism(what, track.monitor, instance), unit=SECOND_UNIT,
                      n_samples=pin.seconds)
        try:  # the cap first on what this process knows (no write while it refuses; admit checks again)
            self._also(ledger.spends, spend)
        except BudgetExceeded as e:
            self.problems.report(key, f"monitor {track.monitor}: {e}; staying silent for it")
            return False
        before = (track.pin, getattr(track, count) if count else None)
        if track.pin is None or count:
            track.pin = pin
            if count:
                setattr(track, count, getattr(track, count) + 1)
            self._save(durable=True)
        charged = self.member.keeper.charge(spend, key=key, who=f"monitor {track.monitor}: ",
                                            resume="staying silent for it", also=self._also,
                                            needs_s=max(b.horizon_s for b in self.settings.monitor_budgets))
        if charged is not Charge.CHARGED:
            track.pin = before[0]
            if count:
                setattr(track, count, before[1])
            self._save()
            return False
        track.last_spend = now
        return True

    # -- Algorithm 1: a noisy vector ------------------------------------------------------------------
    def _send_vector(self, d: MonitorDefinition, pin: Pin, track: Track, v, windows: list[sz.WindowMean],
                     end: datetime, epoch: int) -> bool:
        split = sz.Split(pin.epsilon, pin.violations)
        if not sz.Account(track.vectors, track.zones).can_send_vector(split):
            self.problems.report(f"monitor:{d.monitor}", f"monitor {d.monitor}: its b + 1 = {pin.violations + 1} "
                                 "noisy vectors are spent; no more are sent, whatever the aggregator asks")
            return False
        start = _utc(windows[0].start)
        if not self._spend(track, pin, sz.VECTOR_SPEND, secrets.token_hex(6), split.vector, start, end, end,
                           "vectors"):
            return False
        l1, _ = sz.sensitivity(pin.kind, pin.window)
        track.vector = sz.draw_vector(v, epsilon=split.vector, l1=l1, random_state=self.random_state)
        track.vector_epoch = epoch
        track.refs = {**{k: r for k, r in track.refs.items() if k >= epoch - 1}, epoch: [float(x) for x in v]}
        track.ref_span = {**{k: r for k, r in track.ref_span.items() if k >= epoch - 1}, epoch: (start, end)}
        return True

    # -- Algorithm 3: the zone and its check ----------------------------------------------------------
    def _check(self, d: MonitorDefinition, pin: Pin, track: Track, v, windows: list[sz.WindowMean], end: datetime,
               zone: SafeZone | None | str) -> bool:
        key = f"zone:{d.monitor}"
        if isinstance(zone, str):
            self.problems.report(key, f"monitor {d.monitor}: {zone}; staying silent for this monitor until it can "
                                 "be read")
            return False
        if zone is None or zone.generation != d.generation or zone.epoch != d.epoch:
            return False  # not synced yet, or not part of this epoch (no vector sent for it): silent
        if len(zone.offset) != sz.dims(pin.kind):
            self.problems.report(key, f"monitor {d.monitor}: the safe zone has {len(zone.offset)} offset values, "
                                 f"expected {sz.dims(pin.kind)}; staying silent for this monitor")
            return False
        self.problems.clear(key, f"monitor {d.monitor}: the safe zone is readable again")
        if d.epoch not in track.ref_span:
            return False
        ref_start, ref_end = track.ref_span[d.epoch]
        if windows[0].start < ref_start.timestamp():
            return False  # the check would use windows from before the zone's span: wait (after a gap)
        split = sz.Split(pin.epsilon, pin.violations)
        _, l2 = sz.sensitivity(pin.kind, pin.window)
        changed = False
        if track.zone_epoch != d.epoch:
            if not sz.Account(track.vectors, track.zones).can_open_zone(split):
                self.problems.report(f"monitor:{d.monitor}", f"monitor {d.monitor}: its b = {pin.violations} safe "
                                     "zones are spent; no more checks, whatever the aggregator asks")
                return False
            if (end - ref_end).total_seconds() > MAX_REFERENCE_AGE_S:
                self.problems.report(key, f"monitor {d.monitor}: the safe zone of epoch {d.epoch} came more than "
                                     f"{MAX_REFERENCE_AGE_S:g} s after this member's vector; it is not opened (its "
                                     "checks would start from a stale reference)")
                return False
            instance = secrets.token_hex(6)
            # the zone's first line: its reference windows and the first check's window
            if not self._spend(track, pin, sz.ZONE_SPEND, instance, split.zone, ref_start, end, end, "zones"):
                return False
            track.noisy_radius = sz.draw_radius(zone.radius, epsilon=split.radius, l2=l2,
                                                random_state=self.random_state)
            track.zone_epoch, track.zone_id, track.covered_until, changed = d.epoch, instance, end, True
        elif end > track.covered_until:  # one more window for the zone's checks: its spend first
            if not self._spend(track, pin, sz.ZONE_SPEND, track.zone_id, split.zone, track.covered_until, end, end,
                               None):
                return False
            track.covered_until, changed = end, True
        dist = sz.drift_distance(v, track.refs[d.epoch], zone.offset)
        if sz.draw_outside(dist, track.noisy_radius, epsilon=split.check, l2=l2, random_state=self.random_state):
            track.breach_epoch = d.epoch
            log.debug("monitor %s: left the safe zone of epoch %d (P(outside) was %.3g)", d.monitor, d.epoch,
                      sz.outside_probability(dist, track.noisy_radius, epsilon=split.check, l2=l2))
            if sz.Account(track.vectors, track.zones).can_send_vector(split):  # the violation round's vector now
                self._send_vector(d, pin, track, v, windows, end, d.epoch + 1)
            changed = True
        return changed

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

    def _valid(self, d: MonitorDefinition) -> bool:
        """The definition is one a member may take part in (logged once per monitor when not)."""
        try:
            spec = sz.MonitorSpec(name=d.monitor, kind=d.kind, threshold=d.threshold, margin=d.margin,
                                  window=d.window, epsilon=d.epsilon, violations=d.violations)
        except ValidationError as e:
            self.problems.report(f"monitor-def:{d.monitor}", f"the aggregator's monitor {d.monitor!r} is refused: "
                                 f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']}; not taking part in it")
            return False
        problem = None
        if spec.window > MAX_WINDOWS:
            problem = f"averages {spec.window} windows, more than the {MAX_WINDOWS} kept"
        elif len(d.generation) > MAX_GENERATION_CHARS:
            problem = f"has a generation of {len(d.generation)} characters, more than {MAX_GENERATION_CHARS}"
        if problem is not None:
            self.problems.report(f"monitor-def:{d.monitor}", f"the aggregator's monitor {d.monitor!r} {problem}; "
                                 "not taking part in it")
            return False
        return True

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
                                 breach_epoch=t.breach_epoch)
                   for name, key in sorted(self.current.items()) if (t := self.tracks.get(key)) is not None]
        path = self.paths.monitor_signals_file()
        if signals == self._written and path.exists():
            return
        if not signals and not path.exists():
            self._written = signals
            return
        if self.member.exposed is not None or not (path.parent / SYFTPERM_FILE).exists():
            return  # the member's publish() withdraws and says why; nothing goes where others could read it
        try:
            atomic_write_bytes(path, MonitorSignalsFile(created_at=end, signals=signals).model_dump_json().encode()
                               + b"\n")
            self._written = signals
            self.problems.clear("monitor-write", "the monitor signals are written again")
        except OSError as e:
            self.problems.report("monitor-write", f"cannot write {path}: {e}. Free disk space.")


def also_checks(settings: Settings) -> Callable:
    """The ledger's further checks for a monitor spend, run under its lock: the member's cap on all monitors
    (``monitor_budgets``), and in secure mode with the ``cpu_day`` unit the day's composition with the secure
    releases (``secure.day_check``), so that neither can be spent past by the other."""
    checks = [sz.cap_check(settings.monitor_budgets)]
    if settings.mode == "secure" and settings.secure_unit == DAY_UNIT:
        from cpu_tracker_member.secure import day_check  # secure mode only: it loads the accounting

        checks.append(day_check(settings.secure_target, settings.secure_delta))

    def check(recorded, new: Spend) -> None:
        for c in checks:
            c(recorded, new)

    return check


def composed_words(settings: Settings, spends, start: datetime, end: datetime) -> str | None:
    """What one unit of activity cost in [start, end] with the private alerts' spends composed in (basic
    composition: added), when they spent anything there: one second (local mode, secure ``cpu_second``) or one
    whole window (secure ``cpu_window``). None without monitor spends, and for ``cpu_day``, whose day check already
    composes them."""
    if settings.mode == "secure" and settings.secure_unit == DAY_UNIT:
        return None
    lo, hi = start.timestamp(), end.timestamp()
    starts, ends, eps = sz.monitor_rows([s for s in spends if sz.is_monitor_spend(s)
                                         and s.window_end.timestamp() > lo and s.window_start.timestamp() <= hi])
    if not len(starts):
        return None
    starts, ends = np.maximum(starts, lo), np.minimum(ends, hi + 1e-6)
    if settings.mode == "secure" and settings.secure_unit == WINDOW_UNIT:
        n = settings.samples_per_window
        alerts = n * sz.heaviest_span(starts, ends, eps, settings.interval_s)
        release, unit = settings.secure_target, f"one window ({settings.interval_s:g} s) of activity"
    else:
        alerts = sz.heaviest_span(starts, ends, eps, 0.0)
        release = settings.secure_target if settings.mode == "secure" else settings.epsilon
        unit = "one second of activity"
    return (f"with the private alerts, {unit} cost up to epsilon {release + alerts:.4g} here (releases {release:g} + "
            f"alerts {alerts:.3g})")


def _raw_windows(path) -> list[sz.WindowMean]:
    """The last window means the member kept (``raw.jsonl``) with their times, oldest first; lines without a start
    (older versions) are left out, so no vector can span them. None if it cannot be read."""
    try:
        lines = path.read_text().splitlines()[-MAX_WINDOWS:]
    except (OSError, ValueError):
        return []
    out = []
    for line in lines:
        try:
            row = json.loads(line)
            start = datetime.fromisoformat(row["window_start"]).timestamp()
            end = datetime.fromisoformat(row["window_end"]).timestamp()
            mean = float(row["raw_mean"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if end > start and math.isfinite(mean):
            out.append(sz.WindowMean(start, end, clip_cpu(mean)))
    return out


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


_EPOCH0 = datetime.fromtimestamp(0, timezone.utc)
