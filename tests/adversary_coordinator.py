"""An adversarial alert coordinator: a test double of the aggregator that writes the files a member reads from it
(``public/cpu_tracker/monitors.json`` and the member's own ``zones.json``, where the relay would deliver them) as a
lying aggregator would, and drives the real member code window by window: ``run_member`` (measure, publish with the
real ledger, the private alerts) with fake clocks, SyftBox's files on disk, real diffprivlib noise.

What the member really does with its data is seen at the noise: the three ``shared.privacy.safezone.draw_*`` functions
are wrapped (observed, not replaced), so each vector, radius and check is known with its epsilon, its sensitivity and
the window it was drawn at. ``Verdict`` then compares that with the member's own ledger file, independently of the
member's code (its own arithmetic, brute force):

- ``uncovered``: instants where the data used cost more (per second of activity) than the ledger records there;
- ``peak_instant`` / ``peak_day``: the monitors' spends on any instant / any day (a zone's lines, which share an id,
  counted once), against the member's cap on all monitors (``monitor_budgets``, default 2 and 4);
- ``lifetime``: the monitors' spends in the monitor's own unit (one window mean), against what the member agreed to
  at its first spend of each generation.

Works on the code before pins were kept too (it only needs ``run_member``, the ledger file and the draw functions),
so every strategy can be shown to fail there.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from cpu_tracker_member.member import Member, run_member
from shared.privacy import safezone as sz
from shared.privacy.ledger import load_spends
from shared.logs import Problems
from shared.paths import Paths
from shared.wire.schema import MonitorDefinition, MonitorSignalsFile, MonitorsFile, SafeZone, SafeZonesFile
from shared.settings import Settings

AGG = "agg@example.org"
ME = "m1@example.org"
T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
DEFAULT_CAP_INSTANT, DEFAULT_CAP_DAY = 2.0, 4.0  # the member's default monitor_budgets
INSIDE = {"radius": 10.0, "offset": 0.0}  # a zone the member never leaves (its data is constant)
OUTSIDE = {"radius": 1e-6, "offset": 5.0}  # a zone the member leaves at its first check


@dataclass
class Draw:
    what: str  # vector, radius, check
    at: float  # end of the window it was drawn in (Unix seconds)
    epsilon: float
    sensitivity: float
    dims: int = 1
    radius: float | None = None  # vector: -; radius: the noisy radius drawn; check: the noisy radius it used


@dataclass
class Monitor:
    """What the adversary currently shows for one monitor, and the coordinator's own little state machine."""

    name: str
    generation: str = "g0"
    kind: str = "mean"
    threshold: float = 90.0
    margin: float = 5.0
    window: int = 2
    epsilon: float = 20.0
    violations: int = 2
    started_at: datetime = T0
    ends_at: datetime = T0 + timedelta(days=30)
    epoch: int = 0
    phase: str = "collecting"
    zone: dict = field(default_factory=lambda: dict(INSIDE))
    stalled: int = 0  # windows without progress (the member is exhausted, silent, or refused by its ledger)

    def definition(self) -> MonitorDefinition:
        return MonitorDefinition(monitor=self.name, kind=self.kind, threshold=self.threshold, margin=self.margin,
                                 window=self.window, epsilon=self.epsilon, violations=self.violations,
                                 generation=self.generation, started_at=self.started_at, ends_at=self.ends_at,
                                 epoch=self.epoch, phase=self.phase)


class Adversary:
    """Drives one real member (``m1``) against the monitors it shows. ``act(adv, i)`` runs before the member's
    window i is published and checked: it may change anything (the default plays the coordinator honestly)."""

    def __init__(self, root: Path, monkeypatch, *, settings: Settings | None = None, interval_s: float = 20.0,
                 cpu: Callable[[int], float] = lambda i: 50.0):
        self.settings = settings or Settings(aggregator=AGG, interval_s=interval_s)
        self.paths = Paths(root / "m1", ME)
        self.interval = self.settings.interval_s
        self.cpu = cpu
        self.monitors: dict[str, Monitor] = {}
        self.draws: list[Draw] = []
        self.first_epsilon: dict[tuple[str, str], float] = {}  # (name, generation) -> epsilon at the first vector
        self.now = T0  # the next window's end
        self.windows = 0
        self.restarts: list[float] = []  # times the member process started again
        self._observe(monkeypatch)

    # -- the aggregator's files -------------------------------------------------------------------------
    def show(self, *monitors: Monitor) -> None:
        for m in monitors:
            self.monitors[m.name] = m
        self.write()

    def write(self) -> None:
        defs = MonitorsFile(generated_at=self.now, monitors=[m.definition() for m in self.monitors.values()])
        path = self.paths.monitors_file(AGG)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(defs.model_dump_json())
        zones = [SafeZone(monitor=m.name, generation=m.generation, epoch=m.epoch, state="ok",
                          offset=[m.zone["offset"]] * (1 if m.kind == "mean" else 2), radius=m.zone["radius"])
                 for m in self.monitors.values() if m.phase == "monitoring"]
        path = self.paths.zones_file(ME, AGG)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SafeZonesFile(member=ME, generated_at=self.now, zones=zones).model_dump_json())

    def signals(self) -> dict:
        try:
            return {s.monitor: s for s in MonitorSignalsFile.model_validate_json(
                self.paths.monitor_signals_file().read_bytes()).signals}
        except FileNotFoundError:
            return {}

    def coordinate(self) -> None:
        """The coordinator's honest moves: a breach starts a violation round, a vector for the round opens the
        member's zone (with the zone each monitor is set to give)."""
        sig = self.signals()
        for m in self.monitors.values():
            s = sig.get(m.name)
            mine = s is not None and s.generation == m.generation
            m.stalled += 1
            if m.phase == "monitoring" and mine and s.breach_epoch == m.epoch:
                m.epoch, m.phase, m.stalled = m.epoch + 1, "collecting", 0
            if m.phase == "collecting" and mine and s.vector_epoch == m.epoch:
                m.phase, m.stalled = "monitoring", 0
        self.write()

    def new_generation(self, m: Monitor, name: str) -> None:
        """What an aggregator that lost its state (or wants more) does: the same monitor, a new identity."""
        m.generation, m.epoch, m.phase, m.stalled, m.started_at = name, 0, "collecting", 0, self.now
        self.write()

    # -- the member -----------------------------------------------------------------------------------
    def run(self, windows: int, act: Callable[["Adversary", int], None] | None = None) -> None:
        """One start of the member's process, for ``windows`` windows back to back."""
        act = act or (lambda adv, i: adv.coordinate())
        stop = threading.Event()
        member = Member(self.paths, self.settings, Problems(logging.getLogger("cpu_tracker.member")))
        count = {"read": 0}
        self.restarts.append(self.now.timestamp())

        def wall() -> datetime:  # the start, then each window's end
            t = self.now
            self.now += timedelta(seconds=self.interval)
            return t

        def read() -> float:
            i = count["read"] - 1  # the first reading primes psutil and is discarded
            count["read"] += 1
            if i < 0:
                return 0.0
            act(self, self.windows)
            self.windows += 1
            if i == windows - 1:
                stop.set()
            return self.cpu(self.windows - 1)

        ticks = iter(np.arange(0.0, 1e9, self.interval))
        run_member(member, stop, read=read, wall=wall, clock=lambda: float(next(ticks)))
        self.now -= timedelta(seconds=self.interval)  # the next start is where the last window ended

    def pause(self, seconds: float) -> None:
        """The member's process is stopped for ``seconds`` (its files stay)."""
        self.now += timedelta(seconds=seconds)

    def _observe(self, monkeypatch) -> None:
        real = sz.draw_vector, sz.draw_radius, sz.draw_outside

        def at() -> float:
            return (self.now - timedelta(seconds=self.interval)).timestamp()  # the window being checked

        def draw_vector(v, *, epsilon, l1, random_state=None):
            for m in self.monitors.values():  # which monitor drew it is known when only one is shown
                self.first_epsilon.setdefault((m.name, m.generation), m.epsilon)
            self.draws.append(Draw("vector", at(), epsilon, l1, dims=len(v)))
            return real[0](v, epsilon=epsilon, l1=l1, random_state=random_state)

        def draw_radius(radius, *, epsilon, l2, random_state=None):
            r = real[1](radius, epsilon=epsilon, l2=l2, random_state=random_state)
            self.draws.append(Draw("radius", at(), epsilon, l2, radius=r))
            return r

        def draw_outside(distance, noisy_radius, *, epsilon, l2, random_state=None):
            self.draws.append(Draw("check", at(), epsilon, l2, radius=noisy_radius))
            return real[2](distance, noisy_radius, epsilon=epsilon, l2=l2, random_state=random_state)

        monkeypatch.setattr(sz, "draw_vector", draw_vector)
        monkeypatch.setattr(sz, "draw_radius", draw_radius)
        monkeypatch.setattr(sz, "draw_outside", draw_outside)

    # -- what happened --------------------------------------------------------------------------------
    def spends(self) -> list:
        return [s for s in load_spends(self.paths.ledger_file) if s.mechanism.startswith("safezone_")]

    def verdict(self) -> "Verdict":
        return Verdict.of(self)


def spent_window_unit(ledger_file: Path, interval_s: float) -> float:
    """Every vector and zone in a member's ledger once, in the monitors' unit (one window mean of interval_s)."""
    rows = _rows([s for s in load_spends(ledger_file) if s.mechanism.startswith("safezone_")])
    return float(rows[:, 2].sum()) * math.floor(interval_s + 1e-9)


def _rows(spends) -> np.ndarray:
    """[start, end, epsilon per second] per vector or zone: a zone's lines (same mechanism with an id) are one row,
    its epsilon counted once; lines without an id (the code before pins) are one row each."""
    groups: dict = {}
    for i, s in enumerate(spends):
        key = s.mechanism if ":" in s.mechanism else i
        a, b = s.window_start.timestamp(), s.window_end.timestamp()
        g = groups.setdefault(key, [a, b, s.epsilon])
        g[0], g[1], g[2] = min(g[0], a), max(g[1], b), max(g[2], s.epsilon)
    return np.array(list(groups.values()), dtype=float).reshape(-1, 3)


def _most_on_a_span(rows: np.ndarray, horizon: float) -> float:
    """Brute force: the most the rows touching one closed span [t, t + horizon] add up to (t at every row's start
    and just below every row's end)."""
    if not len(rows):
        return 0.0
    best = 0.0
    for t in np.concatenate([rows[:, 0], rows[:, 1] - 1e-3]):
        touching = (rows[:, 1] > t) & (rows[:, 0] <= t + horizon)
        best = max(best, float(rows[touching, 2].sum()))
    return best


@dataclass
class Verdict:
    uncovered: list[tuple[float, float, float]]  # (instant, true cost, recorded) where the ledger records less
    peak_instant: float
    peak_day: float
    spent_window_unit: float  # every vector and zone once, in the monitor's unit (one window mean)
    agreed_window_unit: float  # the sum, over the generations it spent on, of the epsilon shown at its first spend
    draws: int

    @classmethod
    def of(cls, adv: Adversary) -> "Verdict":
        n = math.floor(adv.interval + 1e-9)
        spends = adv.spends()
        lines = np.array([[s.window_start.timestamp(), s.window_end.timestamp(), s.epsilon] for s in spends],
                         dtype=float).reshape(-1, 3)
        rows = _rows(spends)
        # the true cost of what the member did, per second of activity, on each window it used
        uses: list[tuple[float, float, float]] = []  # (start, end, epsilon per second)
        for d in adv.draws:
            if d.what == "vector":
                k = round((1.0 if d.dims == 1 else 3.0) / d.sensitivity)
                uses.append((d.at - k * adv.interval, d.at, d.epsilon / n))
        radii = {d.radius: d for d in adv.draws if d.what == "radius"}
        checks: dict[float, list[Draw]] = {}
        for d in adv.draws:
            if d.what == "check":
                checks.setdefault(d.radius, []).append(d)
        for r, cs in checks.items():
            zone = radii[r]
            widest = max(c.sensitivity for c in cs)  # the sparse vector's threshold noise pays for its widest query
            true = zone.epsilon * max(1.0, widest / zone.sensitivity) + max(c.epsilon for c in cs)
            start = min(c.at - round(1.0 / c.sensitivity) * adv.interval for c in cs)
            uses.append((start, max(c.at for c in cs), true / n))
        uses_arr = np.array(uses, dtype=float).reshape(-1, 3)
        uncovered = []
        # the middle of every window the member used (all windows are interval_s long here, on one grid)
        step = adv.interval
        for u in sorted({a + (j + 0.5) * step for a, b, _ in uses for j in range(int(round((b - a) / step)))}):
            true = float(uses_arr[(uses_arr[:, 0] <= u) & (uses_arr[:, 1] > u), 2].sum())
            recorded = float(lines[(lines[:, 0] <= u) & (lines[:, 1] > u), 2].sum())
            if true > recorded * (1 + 1e-9) + 1e-12:
                uncovered.append((u, true, recorded))
        agreed = sum(adv.first_epsilon.values())
        return cls(uncovered=uncovered, peak_instant=_most_on_a_span(rows, 0.0),
                   peak_day=_most_on_a_span(rows, 86400.0), spent_window_unit=float(rows[:, 2].sum()) * n,
                   agreed_window_unit=agreed, draws=len(adv.draws))

    def assert_within(self, *, cap_instant: float = DEFAULT_CAP_INSTANT, cap_day: float = DEFAULT_CAP_DAY,
                      lifetime: bool = True) -> None:
        assert not self.uncovered, (f"{len(self.uncovered)} instants where the member used more than its ledger "
                                    f"records, first (instant, true, recorded): {self.uncovered[:3]}")
        assert self.peak_instant <= cap_instant * (1 + 1e-9), f"monitors spent {self.peak_instant:.4g} on one instant"
        assert self.peak_day <= cap_day * (1 + 1e-9), f"monitors spent {self.peak_day:.4g} on one day"
        if lifetime:
            assert self.spent_window_unit <= self.agreed_window_unit * (1 + 1e-9), (
                f"spent {self.spent_window_unit:.4g} for one window mean, agreed to {self.agreed_window_unit:.4g}")


