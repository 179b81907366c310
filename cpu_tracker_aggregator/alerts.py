"""The coordinator of the private alerts over SyftBox files: Algorithms 2 and 4 of ``shared/privacy/safezone.py``.

```txt
aggregator                                         member
public/cpu_tracker/monitors.json  (public) ─────►  reads the monitors and their round (epoch, phase)
                                                   collecting: sends its noisy vector for the epoch
app_data/cpu_tracker/monitor.json (agg only) ◄───  (charged to its ledger first), breach flags
assign: v^, state, ball, centres
app_data/cpu_tracker_alerts/<member>/zones.json ─► its safe zone, readable by it and the aggregator only
```

One ``Alerts.tick`` per aggregator tick: read the members' signal files that changed (each parsed on its own; a bad
one is logged once and ignored), advance each monitor (collect the epoch's vectors until every expected member sent
one or ``stale_after_s`` passed with at least ``min_members``; then assign zones, or stop when b violation rounds are
used; while monitoring, a breach of the epoch's zone starts a violation round), then write what changed: the private
state first (``private/cpu_tracker/aggregator/alerts.json``, which holds the noisy vectors), then the zones, then the
public monitors file. The public state (``AlertState``) goes into the dashboard. A monitor setting that is not valid
is refused in the log and the others run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from datetime import datetime, timedelta, timezone
from typing import Literal

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from cpu_tracker_aggregator.features import Feature, Guarded, member_folders
from cpu_tracker_aggregator.metrics import PERCENT, PREFIX
from cpu_tracker_aggregator.reader import open_datasites, read_report
from shared import APP_NAME
from shared.privacy import safezone as sz
from shared.atomic import PRIVATE, ChangeCache, atomic_write_bytes, write_if_changed
from shared.logs import Problems
from shared.paths import MONITOR_SIGNALS_FILE, Paths, is_datasite_email
from shared.permissions import ensure_permissions, exposure_sentence, guard_for, withhold
from shared.wire.schema import (AlertState, Dashboard, MonitorDefinition, MonitorSignal, MonitorSignalsFile,
                                MonitorsFile, SafeZone, SafeZonesFile)
from shared.settings import Settings

log = logging.getLogger("cpu_tracker.aggregator")
MAX_SIGNALS_BYTES = 65536
# Bounded influence: the violation rounds' worth one member's breach flags may start in one generation. A round is
# shared among the members whose flags for its epoch count, also those that arrive after it started (members that
# checked before they heard of it); a member whose share reaches this is muted: its flags no longer start a round
# (its vector and zone still count). So one member alone starts at most one violation round per generation and costs
# every other member at most epsilon / 3(b + 1) + 2 epsilon / 3b of the monitor's epsilon, and k members together
# start fewer than 2k rounds (each share is below 1 before the round that mutes it, which adds at most 1).
FLAG_ALLOWANCE = 1.0
NOISE_SCALES_ALLOWED = 40  # a vector component further than this many Laplace scales outside [0, 1] is refused


class Run(BaseModel):
    """One monitor's coordinator state (private: it holds the members' noisy vectors)."""

    model_config = ConfigDict(extra="ignore")

    spec_hash: str
    generation: str
    started_at: AwareDatetime
    ends_at: AwareDatetime
    epoch: int = 0
    phase: Literal["collecting", "monitoring", "exhausted"] = "collecting"
    used: int = 0
    collect_since: AwareDatetime
    vectors: dict[str, list[float]] = Field(default_factory=dict)
    expected: list[str] = Field(default_factory=list)
    zones: dict[str, SafeZone] = Field(default_factory=dict)
    zones_issued: int = 0
    assigned_at: AwareDatetime | None = None
    firing: bool | None = None
    since: AwareDatetime | None = None
    f_hat: float | None = None
    end_reason: str = ""
    flaggers: dict[int, list[str]] = Field(default_factory=dict, description="The members whose flags for each "
                                           "epoch started (or later joined) its violation round.")
    late_from: list[str] = Field(default_factory=list, description="The zone holders of the epoch whose round started "
                                 "last: their flags for it may still arrive.")
    muted: list[str] = Field(default_factory=list, description="Members whose share of the rounds reached "
                             "FLAG_ALLOWANCE: their flags no longer start a round in this generation.")


class RunsFile(BaseModel):
    runs: dict[str, Run] = Field(default_factory=dict)


def cost_warnings(specs: list[sz.MonitorSpec], settings: Settings) -> list[str]:
    """Sentences about monitors that members with these same settings could not afford: their ledgers would refuse
    the spends and they would stay silent. Per instant, a member's continuous releases spend ``epsilon`` and every
    monitor it joins up to its lifetime epsilon / n (n: whole seconds per window)."""
    n = settings.samples_per_window
    per_second = sum(s.epsilon for s in specs) / n
    out = []
    for b in settings.monitor_budgets:  # the aggregator's own settings hold the members' default cap
        if per_second > b.epsilon * (1 + 1e-9):
            out.append(f"the monitors together may cost each member up to {per_second:.3g} epsilon per second of "
                       f"activity (their lifetime epsilon / {n} s windows), more than the members' own cap on all "
                       f"private alerts (monitor_budgets: {b.epsilon:g} on any span of {b.horizon_s:g} s): members "
                       "with these settings will refuse some of their spends and stay silent. Run fewer monitors or "
                       "lower their epsilon.")
    for b in settings.budgets:
        if b.horizon_s == 0 and settings.epsilon + per_second > b.epsilon * (1 + 1e-9):
            out.append(f"the monitors cost each member up to {per_second:.3g} epsilon per second of activity (their "
                       f"lifetime epsilon / {n} s windows) beside the releases' {settings.epsilon:g}, more than the "
                       f"budget of {b.epsilon:g} on any instant: members with these settings will refuse some of "
                       "their spends and stay silent. Lower the monitors' epsilon or raise that budget.")
    return out


def flag_shares(flaggers: dict[int, list[str]]) -> dict[str, float]:
    """Each member's share of the violation rounds: 1 / k of each round whose flags counted from k members."""
    shares: dict[str, float] = {}
    for members in flaggers.values():
        for m in members:
            shares[m] = shares.get(m, 0.0) + 1.0 / len(members)
    return shares


def spec_hash(spec: sz.MonitorSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def generation(spec: sz.MonitorSpec, started_at: datetime) -> str:
    """A monitor's identity for its members: a redefined (or restarted) monitor is a new one, with a new lifetime."""
    return hashlib.sha256(f"{spec.model_dump_json()} {started_at.isoformat()}".encode()).hexdigest()[:16]


class Alerts(Feature):
    """The private alerts, an aggregator feature: its state goes beside the figure (``attach``) and into the
    metrics; the safe-zone folders are guarded."""

    name = "alerts"
    what = "private alerts"

    def __init__(self, paths: Paths, settings: Settings, problems: Problems):
        super().__init__(paths, settings, problems)
        self.specs, errors = sz.parse_monitors(settings.monitors)
        for i, error in enumerate(errors):
            problems.report(f"monitor-setting:{i}", error, logging.ERROR)
        for warning in cost_warnings(self.specs, settings):
            log.warning("%s", warning)
        self.runs = self._load()
        self._seen = ChangeCache(follow_symlinks=False)  # each member's monitor file, by member
        self.signals: dict[str, dict[str, MonitorSignal]] = {}  # member -> monitor -> its latest signal
        self._public: list[AlertState] | None = None

    # -- state ------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Run]:
        path = self.paths.alerts_state_file
        try:
            return RunsFile.model_validate_json(path.read_bytes()).runs
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, ValidationError) as e:
            self.problems.report("alerts-state", f"the alerts' state {path} is unreadable ({e}); the monitors start "
                                 "again (members refuse to spend beyond each monitor's budget)", logging.ERROR)
            return {}

    def _save(self) -> None:
        data = RunsFile(runs=self.runs).model_dump_json().encode() + b"\n"
        atomic_write_bytes(self.paths.alerts_state_file, data, mode=PRIVATE)

    # -- one tick ---------------------------------------------------------------------------------------
    def tick(self, now: datetime) -> bool:
        """Advance every monitor; True when the public alert state changed."""
        return self._tick(now) if self.specs else False

    def _tick(self, now: datetime) -> bool:
        self._read_signals()
        changed_private = False
        for spec in self.specs:
            run = self.runs.get(spec.name)
            if run is None or run.spec_hash != spec_hash(spec):
                run = self.runs[spec.name] = Run(spec_hash=spec_hash(spec), generation=generation(spec, now),
                                                 started_at=now, collect_since=now,
                                                 ends_at=now + timedelta(days=spec.lifetime_days))
                changed_private = True
            changed_private |= self._advance(spec, run, now)
        for name in [n for n in self.runs if n not in {s.name for s in self.specs}]:
            del self.runs[name]
            changed_private = True
        if changed_private or "zones-exposed" in self.problems.active:  # the latter: put back what was withdrawn
            try:
                self._save()
                self._write_zones()
                self.problems.clear("alerts-write", "alerts written again")
            except OSError as e:
                self.problems.report("alerts-write", f"cannot write the alerts' files: {e}. Check disk space.")
        try:
            write_if_changed(self.paths.monitors_file(), self.monitors_file().model_dump_json().encode() + b"\n")
        except OSError as e:
            self.problems.report("alerts-write", f"cannot write {self.paths.monitors_file()}: {e}.")
        public = self.states()
        changed = public != self._public
        self._public = public
        return changed

    def _advance(self, spec: sz.MonitorSpec, run: Run, now: datetime) -> bool:
        """Algorithm 4's state machine for one monitor; True when its state changed."""
        if run.phase == "exhausted":
            return False
        if now >= run.ends_at:
            run.phase, run.end_reason = "exhausted", f"its lifetime of {spec.lifetime_days:g} days ended"
            log.info("monitor %s stops: %s", spec.name, run.end_reason)
            return True
        life = sz.Lifecycle(run.epoch, run.phase, run.used)
        mine = {m: sig.get(spec.name) for m, sig in self.signals.items()}
        mine = {m: s for m, s in mine.items() if s is not None and s.generation == run.generation}
        changed = self._late_flags(spec, run, mine)
        if run.phase == "monitoring":
            breached = sorted(m for m in run.zones if m not in run.muted and (s := mine.get(m))
                              and s.breach_epoch == run.epoch)
            if not breached:
                return changed
            run.flaggers[run.epoch], run.late_from = breached, sorted(run.zones)
            self._mute(spec, run)
            life = life.on_violation(spec)
            run.expected = sorted(run.zones)
            run.epoch, run.phase, run.used = life.epoch, life.phase, life.used
            run.vectors, run.collect_since, changed = {}, now, True
            log.info("monitor %s: violation round %d of %d (a member left its safe zone)", spec.name, run.used,
                     spec.violations)
        for m, s in mine.items():  # vectors for this epoch (a breaching member sends the next epoch's at once)
            if s.vector_epoch == run.epoch and s.vector is not None and m not in run.vectors:
                if self._vector_ok(spec, m, s.vector):
                    run.vectors[m] = s.vector
                    changed = True
        waited = (now - run.collect_since).total_seconds() >= self.settings.stale_after_s
        complete = bool(run.expected) and set(run.expected) <= set(run.vectors)
        if not (complete or waited) or len(run.vectors) < self.settings.min_members:
            return changed
        members = sorted(run.vectors)
        noisy = [run.vectors[m] for m in members]
        a = sz.assign(spec, noisy)  # Algorithm 2
        firing = a.state == "firing"
        if firing != run.firing:
            run.since = now
            if run.firing is not None:
                log.info("monitor %s is %s (f estimate %.4g)", spec.name, "FIRING" if firing else "ok again", a.f_hat)
        run.firing, run.f_hat = firing, a.f_hat
        life = life.on_collected(spec)
        run.phase = life.phase
        if life.phase == "exhausted":
            run.zones, run.end_reason = {}, f"its {spec.violations} violation rounds are used up"
            log.warning("monitor %s is exhausted and stops: %s (the state it last decided stays published)",
                        spec.name, run.end_reason)
            return True
        offsets = sz.assign_offsets(a.centre, a.v_hat, noisy)
        run.zones = {m: SafeZone(monitor=spec.name, generation=run.generation, epoch=run.epoch, state=a.state,
                                 offset=[float(x) for x in o], radius=a.radius) for m, o in zip(members, offsets)}
        run.zones_issued, run.assigned_at = run.zones_issued + 1, now
        return True

    def _late_flags(self, spec: sz.MonitorSpec, run: Run, mine: dict[str, MonitorSignal]) -> bool:
        """Flags for the epoch whose violation round started last, from its zone holders not muted, that arrived
        after it started: they share its cost (and may lift a mute that its first flagger alone earned)."""
        e = run.epoch - 1
        late = [m for m in run.late_from if (s := mine.get(m)) is not None and s.breach_epoch == e
                and m not in run.flaggers.get(e, []) and m not in run.muted]
        if not late or e not in run.flaggers:
            return False
        run.flaggers[e] = sorted([*run.flaggers[e], *late])
        self._mute(spec, run)
        return True

    def _mute(self, spec: sz.MonitorSpec, run: Run) -> None:
        """Members whose share of this generation's violation rounds reached FLAG_ALLOWANCE (each logged once)."""
        shares = flag_shares(run.flaggers)
        muted = sorted(m for m, x in shares.items() if x >= FLAG_ALLOWANCE * (1 - 1e-9))
        for m in sorted(set(muted) - set(run.muted)):
            log.warning("monitor %s: the breach flags of %s started %.3g violation round(s) of this generation, its "
                        "allowance: they no longer start a round in this generation", spec.name, m, shares[m])
        run.muted = muted

    def _vector_ok(self, spec: sz.MonitorSpec, member: str, vector: list[float]) -> bool:
        """A noisy vector of the right length within NOISE_SCALES_ALLOWED Laplace scales of [0, 1] (one member's
        influence on v^ stays bounded); otherwise refused, logged once."""
        l1, _ = sz.sensitivity(spec.kind, spec.window)
        reach = NOISE_SCALES_ALLOWED * l1 / sz.split(spec).vector
        ok = len(vector) == sz.dims(spec.kind) and all(math.isfinite(x) and -reach <= x <= 1 + reach for x in vector)
        if not ok:
            self.problems.report(f"signals:{member}:{spec.name}", f"the noisy vector {member} sent for monitor "
                                 f"{spec.name} is refused: {len(vector)} values, expected {sz.dims(spec.kind)}, each "
                                 f"within [{-reach:.3g}, {1 + reach:.3g}]")
        return ok

    # -- files ------------------------------------------------------------------------------------------
    def _read_signals(self) -> None:
        ds = str(self.paths.datasites)
        allowed = set(self.settings.members) if self.settings.members is not None else None
        try:
            names = [n for n in os.listdir(ds) if is_datasite_email(n) and (allowed is None or n in allowed)]
        except OSError:
            return
        parts = ("app_data", APP_NAME, MONITOR_SIGNALS_FILE)
        ds_fd = -1
        try:
            for name in names:
                sig = self._seen.signature(name, os.path.join(ds, name, *parts))
                if sig is None:
                    self.signals.pop(name, None)
                    continue
                if self._seen.unchanged(name, sig):
                    continue
                if ds_fd < 0:
                    ds_fd = open_datasites(ds)
                got = read_report(ds_fd, ds, (name, *parts), MAX_SIGNALS_BYTES)
                self._seen.keep(name, sig)
                key = f"signals:{name}"
                if got is None:
                    continue
                if type(got.data) is not bytes:
                    self.problems.report(key, f"the monitor file of {name} is refused: {got.data}")
                    self.signals.pop(name, None)
                    continue
                try:
                    parsed = MonitorSignalsFile.model_validate_json(got.data)
                except ValidationError as e:
                    self.problems.report(key, f"the monitor file of {name} is refused (not a MonitorSignalsFile: "
                                         f"{e.error_count()} error(s), first: {e.errors()[0]['msg']}); its signals "
                                         "are ignored until it is valid")
                    self.signals.pop(name, None)
                    continue
                self.problems.clear(key, f"the monitor file of {name} is valid again")
                self.signals[name] = {s.monitor: s for s in parsed.signals}
        finally:
            if ds_fd >= 0:
                os.close(ds_fd)

    def _write_zones(self) -> None:
        """Each member's safe zones, in a folder only it (and the aggregator) may read; members without a zone any
        more get an empty list."""
        holders: dict[str, list[SafeZone]] = {}
        times: dict[str, datetime] = {}
        for run in self.runs.values():
            for m, zone in run.zones.items():
                holders.setdefault(m, []).append(zone)
                times[m] = max(times.get(m, _epoch0()), run.assigned_at or _epoch0())
        root = self.paths.zones_dir("x").parent
        known = set(os.listdir(root)) if root.is_dir() else set()
        guard, exposed = guard_for(self.paths.my_datasite, self.paths.sync_state_file), []
        for member in sorted(set(holders) | {m for m in known if is_datasite_email(m)}):
            folder = self.paths.zones_dir(member)
            why = withhold(guard, folder, [member], [self.paths.zones_file(member)])
            if why:  # a permission file would let others read it: withdrawn, written once that is fixed
                exposed.append(why)
                continue
            ensure_permissions(folder, self.paths.email, [member])
            body = SafeZonesFile(member=member, generated_at=times.get(member, _epoch0()),
                                 zones=holders.get(member, []))
            write_if_changed(self.paths.zones_file(member), body.model_dump_json().encode() + b"\n")
        if exposed:
            self.problems.report("zones-exposed", exposure_sentence(exposed, "safe-zone folders"), logging.ERROR)
        else:
            self.problems.clear("zones-exposed", "the safe-zone folders' permission files are safe again")

    def monitors_file(self) -> MonitorsFile:
        """The public definitions and rounds; dated by the last change of any round, so that an unchanged file keeps
        its bytes (every datasite on the relay mirrors it)."""
        defs, last = [], _epoch0()
        for spec in self.specs:
            run = self.runs.get(spec.name)
            if run is None:
                continue
            defs.append(MonitorDefinition(
                monitor=spec.name, kind=spec.kind, threshold=spec.threshold, margin=spec.margin, window=spec.window,
                epsilon=spec.epsilon, violations=spec.violations, generation=run.generation,
                started_at=run.started_at, ends_at=run.ends_at, epoch=run.epoch, phase=run.phase))
            last = max(last, run.started_at, run.collect_since, run.assigned_at or last)
        return MonitorsFile(generated_at=last, monitors=defs)

    def states(self) -> list[AlertState]:
        """The public state of every monitor: post-processing of the members' DP releases only."""
        out = []
        for spec in self.specs:
            run = self.runs.get(spec.name)
            if run is None:
                continue
            s = sz.split(spec)
            spent = s.vector * (run.epoch + 1 if run.phase != "collecting" or run.vectors else run.epoch) \
                + s.zone * run.zones_issued
            if run.phase == "exhausted":
                state = "exhausted"
            elif run.firing is None:
                state = "starting"
            else:
                state = "firing" if run.firing else "ok"
            estimate = None
            if run.f_hat is not None:
                estimate = 100 * run.f_hat if spec.kind == "mean" else 100 * math.sqrt(max(run.f_hat, 0.0))
            unit = "%" if spec.kind == "mean" else " points of standard deviation"
            what = "mean CPU" if spec.kind == "mean" else "the spread of the members' CPU"
            message = {
                "starting": f"collecting the first noisy vectors of the members for {what}",
                "ok": f"{what} below {spec.threshold:g}{unit}",
                "firing": f"{what} above {spec.threshold:g}{unit}",
                "exhausted": f"stopped: {run.end_reason}",
            }[state]
            if run.muted and state != "exhausted":
                message += (f" ({len(run.muted)} member(s) muted for this generation: their flags used their "
                            "allowance and no longer start a round)")
            out.append(AlertState(
                monitor=spec.name, kind=spec.kind, threshold=spec.threshold, margin=spec.margin, window=spec.window,
                state=state, firing=run.firing, since=run.since, violation_rounds_used=run.used,
                violation_rounds=spec.violations, epsilon=spec.epsilon, epsilon_spent=min(spent, spec.epsilon),
                members=len(run.zones), estimate=None if estimate is None else float(np.round(estimate, 3)),
                message=message))
        return out

    def attach(self, dashboard: Dashboard) -> Dashboard:
        """The dashboard with the monitors' public state (unchanged when no monitor runs)."""
        states = self.states() if self.specs else None
        return dashboard.model_copy(update={"alerts": states}) if states else dashboard

    def metrics(self, dashboard: Dashboard):
        """Each private alert's public state (``Dashboard.alerts``), labelled by monitor."""
        if not dashboard.alerts:
            return
        def family(name: str, text: str, labels=("monitor",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_monitor_{name}", text, labels=list(labels))

        firing = family("firing", "1 while the alert fires (the last state it decided, also once exhausted), else 0.")
        exhausted = family("exhausted", "1 once the monitor has used its b violation rounds (or its lifetime) and "
                           "stopped.")
        state = family("state", "1 for the monitor's current state (starting, ok, firing, exhausted).",
                       ("monitor", "state"))
        since = family("since_timestamp_seconds", "When the alert's state last changed (Unix time).")
        used = family("violation_rounds_used", "Violation rounds spent of the monitor's b.")
        rounds = family("violation_rounds", "b: the violation rounds the monitor may spend in its lifetime.")
        spent = family("epsilon_spent", "Epsilon spent so far by a member taking part in every round (one window "
                       "mean).")
        eps = family("epsilon", "The monitor's lifetime epsilon per member (one window mean of its sliding window).")
        threshold = family("threshold_ratio", "T as a ratio (mean CPU, or standard deviation of the members' CPU).")
        estimate = family("estimate_ratio", "f of the last noisy global vector, as a ratio like the threshold.")
        members = family("members", "Members holding a safe zone now.")
        for a in dashboard.alerts:
            m = [a.monitor]
            firing.add_metric(m, 1.0 if a.firing else 0.0)
            exhausted.add_metric(m, 1.0 if a.state == "exhausted" else 0.0)
            for s in ("starting", "ok", "firing", "exhausted"):
                state.add_metric([a.monitor, s], 1.0 if a.state == s else 0.0)
            if a.since is not None:
                since.add_metric(m, a.since.timestamp())
            used.add_metric(m, a.violation_rounds_used)
            rounds.add_metric(m, a.violation_rounds)
            spent.add_metric(m, a.epsilon_spent)
            eps.add_metric(m, a.epsilon)
            threshold.add_metric(m, a.threshold / PERCENT)
            if a.estimate is not None:
                estimate.add_metric(m, a.estimate / PERCENT)
            members.add_metric(m, a.members)
        yield from (firing, exhausted, state, since, used, rounds, spent, eps, threshold, estimate, members)

    def guarded(self) -> list[Guarded]:
        p = self.paths
        return [member_folders("zones-exposed", "safe-zone folders", p.zones_dir, p.zones_file)]


def _epoch0() -> datetime:
    return datetime.fromtimestamp(0, timezone.utc)
