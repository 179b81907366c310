"""Faults: crashes anywhere, concurrent readers, a full / read-only / vandalised disk, clock trouble.

Crash tests fork the test process (imports paid once) and run the real member loop (``run_member``) or
the real aggregator tick in the child, then kill it with SIGKILL after a seeded random delay, or make the
k-th write / fsync / replace of the child exit on the spot (every crash point, deterministically; a write
is cut in the middle first). After every kill the files are audited as the next process would find them:

- no file is half-written: the report, the permission files, the dashboard, history.json, members.json
  are absent or complete and valid (a kill can only leave ``.*.tmp`` files, which SyftBox never uploads
  and the next start removes);
- the ledger parses (a torn last line is cut by design) and no rolling budget is ever exceeded, checked
  by an independent oracle over every release ever seen in the ledger (compaction included), not only
  what the file holds now;
- every report ever published, and every raw-file line, belongs to a release recorded in the ledger.

Disk full and read-only use a real tmpfs mount (CI runs as root; skipped where mounting is not allowed).
Seeds are fixed; ``--long`` runs 10x more kills and rewrites.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import diffprivlib.mechanisms  # noqa: F401 - imported once here (1.4 s), not in every forked child
import numpy as np
import pytest

from cpu_tracker_aggregator.aggregator import PAGE, Aggregator
from cpu_tracker_aggregator.validate import parse_report
from cpu_tracker_member.member import Member, build_report, run_member
from shared.atomic import atomic_write_json
from shared.privacy.ledger import Ledger, Spend, load_spends
from shared.logs import Problems
from cpu_tracker_aggregator.publish import read_history
from shared.paths import (CURRENT_FILE, DASHBOARD_SCHEMA_FILE, HISTORY_DIR, HISTORY_INDEX_FILE, PAGE_FILE, REPORT_FILE,
                          REPORT_SCHEMA_FILE, Paths)
from shared.permissions import permission_files
from shared.wire.catalog import json_schemas, schema_text
from shared.wire.schema import Current, Dashboard, History, HistoryIndex, MemberReport, Segment
from shared.privacy import Budget
from shared.settings import Settings
from tests.conftest import FakeClock, FakeWall

ME, AGG = "me@example.org", "agg@example.org"
PEERS = [f"peer{i}@example.org" for i in range(4)]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SEED = 20260101
KILLED = -signal.SIGKILL
RECENT_S = 24 * 3600  # the dashboard's full-resolution history covers 24 h (docs/dashboard.md): older go by design

# Tight budgets, so that the crash runs also refuse releases all the time (a window spends 5 per second of activity):
# any instant twice at most, about 4 windows per 5 minutes, 16 per half hour.
CRASH_BUDGETS = (Budget(horizon_s=0, epsilon=10.0), Budget(horizon_s=300, epsilon=20.0),
                 Budget(horizon_s=1800, epsilon=80.0))


AUDIT_AGG = Settings(aggregator=AGG, max_noise_scale=20.0)  # 1 s windows (1 unit) at epsilon 5: scale 20


def member_settings(**kw) -> Settings:
    return Settings(**{"aggregator": AGG, "interval_s": 1.0, "sample_period_s": 0.1, **kw})


# ---------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------
def fork(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child (exit 0 when it returns, 70 with the traceback on stderr if it raises)."""
    with warnings.catch_warnings():  # Python 3.12+ warns when forking with threads; none of ours hold locks here
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            logging.disable(logging.CRITICAL)  # the parent's log capture is not for children
            fn()
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's exit code, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def kill(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return wait(pid)


@dataclass
class SimWall:
    """A UTC wall clock running ``speed`` times faster than the machine's monotonic clock (shared by every
    child), shifted by ``offset_s``: a clock that can be stepped back or ahead between restarts."""

    base: float
    speed: float
    offset_s: float = 0.0

    def __call__(self) -> datetime:
        return T0 + timedelta(seconds=(time.monotonic() - self.base) * self.speed + self.offset_s)


def crash_at(k: int, names=("write", "fsync", "replace", "ftruncate")) -> None:
    """In a child: make the k-th call of any of ``os.<names>`` exit the process on the spot, like a SIGKILL
    at that instant. ``os.write`` first writes half of its data: a write torn in the middle."""
    calls = [0]

    def wrap(name: str, real):
        def crashing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                if name == "write":
                    fd, data = args
                    real(fd, bytes(data)[: max(1, len(data) // 2)])
                os._exit(137)
            return real(*args, **kwargs)

        return crashing

    for name in names:
        setattr(os, name, wrap(name, getattr(os, name)))


def stop_after(reads: int, value: Callable[[int], float]) -> tuple[threading.Event, Callable[[], float]]:
    """A stop event and a ``read`` that returns value(i) and sets the event at its ``reads``-th call."""
    stop, count = threading.Event(), [0]

    def read() -> float:
        count[0] += 1
        if count[0] >= reads:
            stop.set()
        return value(count[0])

    return stop, read


# ---------------------------------------------------------------------------------------------------
# The audit: what the next process (or SyftBox's uploader) would find on disk
# ---------------------------------------------------------------------------------------------------
def worst_spans(spends: list[Spend], horizon_s: float, chunk: int = 512) -> float:
    """Independent oracle for the most epsilon any closed span [t, t + H] is touched by (windows [s, e)).

    Sweeping t upwards, a window enters at t = s - H and leaves at t = e; the total can only peak where one
    enters, so the maximum is max_i sum_j eps_j [s_j <= s_i][e_j > s_i - H] (the ledger slides to window
    ends instead: a different derivation of the same number). O(n^2), in chunks."""
    if not spends:
        return 0.0
    s = np.array([x.window_start.timestamp() for x in spends])
    e = np.array([x.window_end.timestamp() for x in spends])
    eps = np.array([x.epsilon for x in spends])
    worst = 0.0
    for i in range(0, len(s), chunk):
        si = s[i: i + chunk, None]
        touch = (s[None, :] <= si) & (e[None, :] > si - horizon_s)
        worst = max(worst, float((touch * eps[None, :]).sum(axis=1).max()))
    return worst


def window_key(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    return (start, end)


class SpanOracle:
    """``worst_spans`` kept up to date as releases arrive: only the entering points that a new release can
    change (s_i in [s_j, e_j + H) for a new j) and the new ones are recomputed."""

    def __init__(self, horizon_s: float):
        self.h = horizon_s
        self.s, self.e, self.eps = np.empty(0), np.empty(0), np.empty(0)

    def add(self, spends: list[Spend]) -> float:
        """Add ``spends``; return the most epsilon any span touching one of the changed points holds."""
        if not spends:
            return 0.0
        n0 = len(self.s)
        self.s = np.concatenate([self.s, [x.window_start.timestamp() for x in spends]])
        self.e = np.concatenate([self.e, [x.window_end.timestamp() for x in spends]])
        self.eps = np.concatenate([self.eps, [x.epsilon for x in spends]])
        ns, ne = self.s[n0:, None], self.e[n0:, None]
        changed = ((self.s[None, :] >= ns) & (self.s[None, :] < ne + self.h)).any(axis=0)
        changed[n0:] = True
        worst = 0.0
        rows = np.flatnonzero(changed)
        for i in range(0, len(rows), 256):
            si = self.s[rows[i: i + 256], None]
            touch = (self.s[None, :] <= si) & (self.e[None, :] > si - self.h)
            worst = max(worst, float((touch * self.eps[None, :]).sum(axis=1).max()))
        return worst


@dataclass
class MemberAudit:
    paths: Paths
    settings: Settings
    seen: Counter = field(default_factory=Counter)  # every release ever seen in the ledger (a multiset)
    published: set[tuple[datetime, datetime, float]] = field(default_factory=set)
    audits: int = 0
    torn_temps: int = 0
    oracles: list[SpanOracle] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.oracles = [SpanOracle(b.horizon_s) for b in self.settings.budgets]

    def check(self) -> None:
        self.audits += 1
        spends = load_spends(self.paths.ledger_file)  # LedgerCorrupt fails the test; a torn tail is cut
        data = self.paths.ledger_file.read_bytes() if self.paths.ledger_file.exists() else b""
        assert not data or data.endswith(b"\n"), "a torn ledger line survived a load"
        # identical releases are legitimate (a clock that repeats itself): count them as a multiset; what
        # compaction drops stays counted
        new = list((Counter(spends) - self.seen).elements())
        self.seen.update(new)
        for b, oracle in zip(self.settings.budgets, self.oracles):
            worst = oracle.add(new)
            assert worst <= b.epsilon * (1 + 1e-9), (
                f"budget {b.epsilon} per {b.horizon_s} s exceeded: {worst} over {len(self.seen)} releases")
        in_file = {window_key(s.window_start, s.window_end): s for s in spends}
        ever = {window_key(s.window_start, s.window_end): s for s in self.seen}

        folder = self.paths.report_dir()
        if folder.exists():
            expected = permission_files(self.paths.email, [self.settings.aggregator])
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.name in expected:
                    assert Path(entry.path).read_bytes() == expected[entry.name], f"{entry.name} half-written"
                elif entry.name != REPORT_FILE:
                    assert entry.name.startswith(".") and entry.name.endswith(".tmp"), entry.name
                    self.torn_temps += 1
        report_path = self.paths.report_file()
        if report_path.exists():
            raw = report_path.read_bytes()
            report = MemberReport.model_validate_json(raw)  # complete and valid, or the test fails
            parse_report(raw, now=report.created_at, settings=AUDIT_AGG)  # the aggregator accepts it
            key = window_key(report.window.start, report.window.end)
            assert key in ever, f"report for window {key} was published without a ledger record"
            latest = max((s.released_at for s in spends), default=report.created_at)
            retention = timedelta(seconds=max(b.horizon_s for b in self.settings.budgets) + 3600)
            if report.window.end > latest - retention:
                assert key in in_file, "the published report's release is missing from the ledger file"
            assert report.release.epsilon == ever[key].epsilon
            self.published.add((*key, report.release.value))
        raw_file = self.paths.raw_file
        if raw_file.exists():
            ends = {s.window_end for s in self.seen}
            for line in raw_file.read_text().splitlines():
                row = json.loads(line)
                assert datetime.fromisoformat(row["window_end"]) in ends, "a raw line without a ledger record"
        if self.paths.ledger_file.parent.exists():
            for entry in sorted(os.scandir(self.paths.ledger_file.parent), key=lambda e: e.name):
                assert entry.name in ("ledger.jsonl", "raw.jsonl") or entry.name.endswith(".tmp"), entry.name


# ---------------------------------------------------------------------------------------------------
# Crash anywhere: the member
# ---------------------------------------------------------------------------------------------------
def test_member_survives_sigkill_anywhere(tmp_path: Path, long_run: bool) -> None:
    """Hundreds of SIGKILLs at seeded random instants of the real member loop (sampling, ledger append,
    report and raw writes, permission repair, ledger compaction), with the clock stepped back or ahead at
    some restarts. After every kill: nothing half-written, the ledger parses, no budget is exceeded over
    every release ever recorded, every published report is in the ledger."""
    kills = 2500 if long_run else 250
    rng = random.Random(SEED)
    settings = member_settings(budgets=CRASH_BUDGETS)
    paths = Paths(data_dir=tmp_path, email=ME)
    audit = MemberAudit(paths, settings)
    wall = SimWall(base=time.monotonic(), speed=20000.0)  # a loop turn of ~3 ms is a window of ~1 minute
    steps = 0
    for i in range(kills):
        if rng.random() < 0.1:  # the clock was stepped back (up to 10 min) or ahead (up to 30 min) meanwhile
            wall.offset_s += rng.choice([-1, 1]) * rng.uniform(0, 600) if rng.random() < 0.7 else rng.uniform(0, 1800)
            steps += 1
        seed = rng.randrange(2**32)

        def child(wall=wall, seed=seed) -> None:
            values = random.Random(seed)
            member = Member(paths, settings, Problems(logging.getLogger("child")))
            run_member(member, threading.Event(), read=lambda: values.uniform(0, 100), wall=wall, clock=FakeClock())

        pid = fork(child)
        time.sleep(rng.choice([0.0, 0.001, rng.uniform(0, 0.004), rng.uniform(0, 0.03)]))
        code = kill(pid)
        assert code == KILLED, f"the member died by itself (exit {code}) before kill {i}: see its stderr"
        audit.check()
    # a last, clean run: resumes, and the temp files left by the kills are gone
    stop, read = stop_after(4, lambda i: 50.0)
    assert wait(fork(lambda: run_member(Member(paths, settings, Problems(logging.getLogger("c"))), stop, read=read,
                                        wall=wall, clock=FakeClock()))) == 0
    audit.check()
    leftovers = [p.name for p in (paths.report_dir(), paths.ledger_file.parent) for p in p.iterdir()
                 if p.name.endswith(".tmp")]
    assert leftovers == []
    assert audit.seen.total() >= 25 and len(audit.published) >= 10, "the loop barely ran"
    assert steps > 0
    print(f"member: {kills} SIGKILLs, {audit.seen.total()} releases recorded, {len(audit.published)} reports "
          f"seen, {audit.torn_temps} temp files seen after kills, {steps} clock steps")


def test_two_instances_never_overspend_together(tmp_path: Path, long_run: bool) -> None:
    """Two member processes on the same datasite at once (say, the instance lock file was deleted and a second
    copy started): each admits a release only under the ledger's lock, after reading what the other appended,
    so their releases together never exceed a budget; SIGKILLed at random, restarted, many times."""
    settings = member_settings(budgets=CRASH_BUDGETS)
    paths = Paths(data_dir=tmp_path, email=ME)
    audit = MemberAudit(paths, settings)
    wall = SimWall(base=time.monotonic(), speed=20000.0)
    rng = random.Random(SEED + 2)
    for i in range(300 if long_run else 30):
        def child(seed: int) -> None:
            member = Member(paths, settings, Problems(logging.getLogger("child")))
            values = random.Random(seed)
            run_member(member, threading.Event(), read=lambda: values.uniform(0, 100), wall=wall, clock=FakeClock())

        pids = [fork(lambda s=rng.randrange(2**32): child(s)) for _ in range(2)]
        time.sleep(rng.uniform(0.005, 0.05))
        assert [kill(pid) for pid in pids] == [KILLED, KILLED]
        audit.check()
    assert audit.seen.total() >= 20


def _template(tmp_path: Path, settings: Settings) -> Path:
    """A member workspace that has run before: a report, and 300 releases older than the ledger's retention,
    so that the first release of the next run compacts the ledger (its rewrite is a crash point too)."""
    root = tmp_path / "template"
    paths = Paths(data_dir=root, email=ME)
    old = [Spend(released_at=T0 - timedelta(days=10, seconds=-i), window_start=T0 - timedelta(days=10, seconds=1 - i),
                 window_end=T0 - timedelta(days=10, seconds=-i), epsilon=0.5, mechanism="laplace", n_samples=10)
           for i in range(300)]
    paths.ledger_file.parent.mkdir(parents=True)
    paths.ledger_file.write_text("".join(s.model_dump_json() + "\n" for s in old))
    stop, read = stop_after(2, lambda i: 10.0)
    run_member(Member(paths, settings, Problems(logging.getLogger("t"))), stop, read=read,
               wall=FakeWall(T0 - timedelta(days=1)), clock=FakeClock())
    return root


def test_member_survives_a_crash_at_every_write(tmp_path: Path) -> None:
    """Deterministic: for every k, a fresh copy of a used workspace, and a member that dies at its k-th
    write / fsync / rename / truncate (a write cut in half first) while it starts, compacts the ledger and
    publishes three windows. Then the audit, and a clean restart that must publish again."""
    settings = member_settings()
    template = _template(tmp_path, settings)
    k, exits = 0, []
    while True:
        k += 1
        root = tmp_path / f"k{k}"
        shutil.copytree(template, root)
        paths = Paths(data_dir=root, email=ME)
        audit = MemberAudit(paths, settings)
        audit.check()

        def child(k=k, paths=paths) -> None:
            stop, read = stop_after(4, lambda i: 20.0 + i)
            crash_at(k)
            run_member(Member(paths, settings, Problems(logging.getLogger("c"))), stop, read=read,
                       wall=FakeWall(T0), clock=FakeClock())

        code = wait(fork(child))
        assert code in (0, 137), f"crash point {k}: the member failed (exit {code}): see its stderr"
        audit.check()
        stop, read = stop_after(2, lambda i: 70.0)
        restart = fork(lambda: run_member(Member(paths, settings, Problems(logging.getLogger("c"))), stop,
                                          read=read, wall=FakeWall(T0 + timedelta(hours=1)), clock=FakeClock()))
        assert wait(restart) == 0
        audit.check()
        report = MemberReport.model_validate_json(paths.report_file().read_bytes())
        assert report.window.end > T0 + timedelta(hours=1), f"crash point {k}: no report after the restart"
        assert not [p for p in paths.report_dir().iterdir() if p.name.endswith(".tmp")]
        shutil.rmtree(root)
        exits.append(code)
        if code == 0:
            break
    assert exits.count(137) == k - 1 >= 20, f"only {k - 1} crash points"
    print(f"member: crashed at each of {k - 1} write/fsync/rename/truncate points")


# ---------------------------------------------------------------------------------------------------
# Crash anywhere: the aggregator
# ---------------------------------------------------------------------------------------------------
def write_peer_reports(paths: Paths, now: datetime, seed: int, peers=PEERS) -> None:
    """Reports of ``peers`` for the window ending ``now``, written as the member app writes them."""
    for i, peer in enumerate(peers):
        _, report = build_report(20.0 + 15 * i, 20, now - timedelta(seconds=20), now, Settings(aggregator=AGG),
                                 random_state=seed + i)
        atomic_write_json(paths.report_file(peer), report.model_dump(mode="json"))


@dataclass
class AggregatorAudit:
    paths: Paths
    saved: list[int] = field(default_factory=list)  # history.json's recent.t at the previous audit
    shown: set[int] = field(default_factory=set)  # every t any published dashboard showed
    lost_shown: set[int] = field(default_factory=set)  # shown on a dashboard, then gone after a restart
    audits: int = 0

    def check(self) -> None:
        self.audits += 1
        public = self.paths.public_dir()
        expected = {**permission_files(self.paths.email, ["*"]),
                    **{name: schema_text(schema).encode() for name, schema in json_schemas().items()}}
        dash = None
        if public.exists():
            for entry in sorted(os.scandir(public), key=lambda e: e.name):
                if entry.is_dir():
                    assert entry.name == HISTORY_DIR, entry.name
                    for seg in os.scandir(entry.path):
                        data = Path(seg.path).read_bytes()
                        if seg.name == "index.json":
                            HistoryIndex.model_validate_json(data)
                        elif not seg.name.endswith(".tmp"):
                            Segment.model_validate_json(data)  # a half-written segment fails here
                    continue
                data = Path(entry.path).read_bytes()
                if entry.name in expected:
                    assert data == expected[entry.name], f"{entry.name} half-written"
                elif entry.name == "dashboard.json":
                    Dashboard.model_validate_json(data)
                elif entry.name == CURRENT_FILE:
                    Current.model_validate_json(data)
                elif entry.name == PAGE_FILE:
                    assert data == PAGE.read_bytes(), "index.html half-written"
                else:
                    assert entry.name.startswith(".") and entry.name.endswith(".tmp"), entry.name
            if (public / CURRENT_FILE).exists() and (public / HISTORY_INDEX_FILE).exists():
                dash = read_history(public)[1]
        saved: list[int] = []
        if self.paths.history_file.exists():
            hist = History.model_validate_json(self.paths.history_file.read_bytes())
            saved = hist.recent.t
            assert saved == sorted(set(saved)), "history times not strictly increasing"
            lost = [t for t in self.saved if t not in set(saved) and t >= saved[-1] - RECENT_S]
            assert not lost, f"saved history points lost (not by the 24 h trim): {lost}"
            assert hist.coarse.t == sorted(set(hist.coarse.t))
        if self.paths.members_status_file.exists():
            assert "members" in json.loads(self.paths.members_status_file.read_bytes())
        if dash is not None:  # the history as a reader of the public folder assembles it
            shown = dash.recent.t
            assert shown == sorted(set(shown))
            # history.json is written before the dashboard: a published point is always saved
            unsaved = [t for t in shown if t not in set(saved) and saved and t >= saved[-1] - RECENT_S]
            assert not unsaved, f"the dashboard shows points the saved history lacks: {unsaved}"
            self.lost_shown |= {t for t in self.shown if t not in shown and t not in saved and t >= shown[-1] - RECENT_S}
            self.shown |= set(shown)
        self.saved = saved


def test_aggregator_survives_sigkill_anywhere(tmp_path: Path, long_run: bool) -> None:
    """Hundreds of SIGKILLs at seeded random instants of the real aggregator tick loop (reading reports that
    the test keeps rewriting, publishing the dashboard, writing history.json and members.json). After every
    kill: every file complete and valid, history times strictly increasing, no saved history point lost."""
    kills = 2000 if long_run else 200
    rng = random.Random(SEED + 1)
    settings = Settings(aggregator=AGG, min_members=3)
    paths = Paths(data_dir=tmp_path, email=AGG)
    audit = AggregatorAudit(paths)
    for n in (3, 4):  # the exact interval for n members is computed once (cached): here, not in every child
        warm = Paths(data_dir=tmp_path / f"warm{n}", email=AGG)
        write_peer_reports(warm, T0, seed=0, peers=PEERS[:n])
        Aggregator(warm, settings, Problems(logging.getLogger("warm"))).tick(T0)
    wall = SimWall(base=time.monotonic(), speed=1000.0)  # ticks >= 2 sim-seconds apart; 24 h is never reached
    for i in range(kills):
        write_peer_reports(paths, wall(), seed=i, peers=PEERS[: rng.choice([2, 3, 4])])

        def child() -> None:
            agg = Aggregator(paths, settings, Problems(logging.getLogger("child")))
            while True:
                agg.tick(wall())
                time.sleep(0.0012)  # consecutive ticks at least a sim-second apart (history has whole seconds)

        pid = fork(child)
        time.sleep(rng.choice([0.0, 0.002, rng.uniform(0, 0.01), rng.uniform(0, 0.06)]))
        code = kill(pid)
        assert code == KILLED, f"the aggregator died by itself (exit {code}) before kill {i}: see its stderr"
        audit.check()
    assert len(audit.saved) >= 20, "the loop barely ran"
    print(f"aggregator: {kills} SIGKILLs, {len(audit.saved)} history points kept, "
          f"{len(audit.lost_shown)} points shown on a dashboard then lost by a kill")


def test_aggregator_crash_never_takes_back_a_published_point(tmp_path: Path) -> None:
    settings = Settings(aggregator=AGG, min_members=3)
    paths = Paths(data_dir=tmp_path, email=AGG)
    write_peer_reports(paths, T0, seed=1)
    Aggregator(paths, settings, Problems(logging.getLogger("a"))).tick(T0)
    audit = AggregatorAudit(paths)
    audit.check()
    for k in range(1, 40):
        def child(k=k) -> None:
            crash_at(k, names=("replace",))
            Aggregator(paths, settings, Problems(logging.getLogger("c"))).tick(T0 + timedelta(seconds=10 * k))

        if wait(fork(child)) == 0:
            break
        audit.check()
    Aggregator(paths, settings, Problems(logging.getLogger("a"))).tick(T0 + timedelta(hours=1))
    audit.check()
    assert audit.lost_shown == set()


# ---------------------------------------------------------------------------------------------------
# Concurrent readers
# ---------------------------------------------------------------------------------------------------
def test_readers_never_see_a_partial_report_or_dashboard(tmp_path: Path, long_run: bool) -> None:
    """Two writer processes rewrite the report (the real Member.publish) and the dashboard (the real
    Aggregator.tick) thousands of times while this process reads both files as fast as it can: every read is
    a complete, valid file."""
    with tmpfs(tmp_path / "fs", "256m") as mounted:  # where allowed: fsync costs nothing, so more rewrites per second
        _readers_race(tmp_path / "fs" if mounted else tmp_path, 20000 if long_run else 2000)


def _readers_race(root: Path, rewrites: int) -> None:
    member_paths = Paths(data_dir=root, email=ME)
    agg_paths = Paths(data_dir=root, email=AGG)
    write_peer_reports(agg_paths, T0, seed=7)

    def member_writer() -> None:
        member = Member(member_paths, member_settings(budgets=(Budget(horizon_s=0, epsilon=10.0),)),
                        Problems(logging.getLogger("w")))
        for i in range(rewrites):
            start = T0 + timedelta(seconds=i)
            assert member.publish(float(i % 101), start, start + timedelta(seconds=1)) is not None

    def dashboard_writer() -> None:
        # the member's 1 s windows carry noise of scale 20: accepted here, so that each new report moves the figure
        # and every tick publishes (a tick that changed nothing writes nothing)
        agg = Aggregator(agg_paths, Settings(aggregator=AGG, min_members=1, max_noise_scale=100),
                         Problems(logging.getLogger("w")))
        for i in range(rewrites):
            agg.tick(T0 + timedelta(seconds=1 + i))

    member_writer_pid = fork(member_writer)
    # the first report exists before the reader starts, so that every read below must succeed
    deadline = time.monotonic() + 30
    current_file = agg_paths.public_dir() / CURRENT_FILE
    while not (member_paths.report_file().exists() and current_file.exists()):
        if not current_file.exists():
            Aggregator(agg_paths, Settings(aggregator=AGG, min_members=1), Problems(logging.getLogger("w"))).tick(T0)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    dashboard_writer_pid = fork(dashboard_writer)
    reads, versions = 0, {"report": set(), "dashboard": set()}
    running = {member_writer_pid, dashboard_writer_pid}
    perm_expected = permission_files(ME, [AGG])
    while running:
        for name, path, model in (("report", member_paths.report_file(), MemberReport),
                                  ("dashboard", current_file, Current)):
            data = path.read_bytes()
            obj = model.model_validate_json(data)  # a partial file fails here
            versions[name].add(obj.created_at if name == "report" else obj.generated_at)
            reads += 1
        for perm, expected in perm_expected.items():
            assert (member_paths.report_dir() / perm).read_bytes() == expected
        time.sleep(0.0002)  # leave the writers CPU: two cores are enough for this test
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0, "a writer failed: see its stderr"
                running.discard(pid)
    assert len(versions["report"]) > rewrites // 20 and len(versions["dashboard"]) > rewrites // 20
    print(f"readers: {reads} reads, {len(versions['report'])} report and {len(versions['dashboard'])} dashboard "
          f"versions seen, over {rewrites} rewrites each, no partial file")


# ---------------------------------------------------------------------------------------------------
# Disk full, read-only, vandalised folders
# ---------------------------------------------------------------------------------------------------
@contextmanager
def tmpfs(mnt: Path, size: str):
    """Mount a tmpfs of ``size`` at ``mnt`` (root only); yields False, mounting nothing, where not allowed."""
    mnt.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 1 MiB tmpfs mounted at tmp_path/fs (root only; skipped where mounting is not allowed)."""
    with tmpfs(tmp_path / "fs", "1m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        yield tmp_path / "fs"


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler file (delete it to free)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def assert_each_logged_once(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    hits = [m for m in messages(caplog) if needle in m]
    assert hits, f"nothing logged about {needle!r}"
    assert len(hits) == len(set(hits)), f"logged more than once: {hits}"
    return hits


def new_member(paths: Paths, settings: Settings) -> Member:
    return Member(paths, settings, Problems(logging.getLogger("cpu_tracker.member")))


def member_on(data_dir: Path) -> tuple[Paths, Settings, Member, MemberAudit, FakeWall]:
    """A member of ``data_dir`` with the fault tests' settings, its auditor and a wall clock from T0."""
    paths, settings = Paths(data_dir=data_dir, email=ME), member_settings()
    return paths, settings, new_member(paths, settings), MemberAudit(paths, settings), FakeWall(T0)


def drive(member: Member, wall: FakeWall, windows: int, value: float = 30.0) -> list[MemberReport | None]:
    out = []
    for _ in range(windows):
        start = wall.now
        out.append(member.publish(value, start, wall()))
    return out


def test_member_disk_full_then_freed(tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk: each problem logged once with what to do, nothing half-written, the ledger intact (a
    short write of its line is rolled back), no report without a ledger record; then it resumes by itself."""
    caplog.set_level(logging.INFO)
    paths, settings, member, audit, wall = member_on(tiny_fs)
    assert all(drive(member, wall, 3))
    good = paths.report_file().read_bytes()
    filler = fill(tiny_fs)
    results = drive(member, wall, 40)
    audit.check()
    assert not any(results), "published on a full disk"
    assert paths.report_file().read_bytes() == good
    logged = assert_each_logged_once(caplog, "No space left")
    assert any("Free disk space" in m or "ledger, not publishing" in m for m in logged)
    filler.unlink()
    assert all(drive(member, wall, 3)), "did not resume once space was freed"
    audit.check()
    assert paths.report_file().read_bytes() != good
    assert [m for m in messages(caplog) if "again" in m], "the end of the problem was not logged"
    assert audit.seen.total() >= 6


def test_ledger_short_write_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full in the middle of a ledger line: the partial line is cut at once, so the next release appends
    after a complete line (a torn line in the middle would pause releases for good)."""
    ledger = Ledger(tmp_path / "ledger.jsonl", CRASH_BUDGETS)
    spends = [Spend(released_at=T0 + timedelta(minutes=i + 1), window_start=T0 + timedelta(minutes=i),
                    window_end=T0 + timedelta(minutes=i + 1), epsilon=0.1, mechanism="laplace", n_samples=10)
              for i in range(3)]
    ledger.admit(spends[0])
    real_write = os.write

    def short_then_full(fd: int, data) -> int:
        real_write(fd, bytes(data)[:17])  # part of the line lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError):
        ledger.admit(spends[1])
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / "ledger.jsonl").read_bytes().endswith(b"\n")
    ledger.admit(spends[2])
    assert load_spends(tmp_path / "ledger.jsonl") == [spends[0], spends[2]] == Ledger(ledger.path, CRASH_BUDGETS).spends


def test_member_read_only_then_writable(tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file system turns read-only while the member runs, and later at a start: logged once, nothing
    published, state kept; writable again: resumes by itself."""
    caplog.set_level(logging.INFO)
    paths, settings, member, audit, wall = member_on(tiny_fs)
    assert all(drive(member, wall, 2))
    remount(tiny_fs, "ro")
    try:
        assert not any(drive(member, wall, 5))
        assert_each_logged_once(caplog, "Read-only file system")
        caplog.clear()
        restarted = new_member(paths, settings)
        assert not any(drive(restarted, wall, 5))
        assert_each_logged_once(caplog, "Read-only file system")
    finally:
        remount(tiny_fs, "rw")
    audit.check()
    assert all(drive(member, wall, 2)) and all(drive(restarted, wall, 2))
    audit.check()
    assert len(load_spends(paths.ledger_file)) == 6


def test_read_only_report_folder_spends_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Only the report folder is read-only (a bind mount): the member publishes nothing and spends no budget
    on windows it cannot publish; logged once; writable again: resumes."""
    paths = Paths(data_dir=tmp_path, email=ME)
    member = Member(paths, member_settings(), Problems(logging.getLogger("cpu_tracker.member")))
    wall = FakeWall(T0)
    assert all(drive(member, wall, 1))
    folder = str(paths.report_dir())
    if subprocess.run(["mount", "--bind", folder, folder], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
        assert not any(drive(member, wall, 4))
        assert len(load_spends(paths.ledger_file)) == 1, "budget spent on windows that could not be published"
        assert len([m for m in messages(caplog) if "not writable" in m or "Read-only" in m]) == 1
    finally:
        subprocess.run(["umount", folder], check=False)
    assert all(drive(member, wall, 1))


def test_aggregator_disk_full_and_read_only(tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The aggregator on a full, then read-only, disk: logged once, keeps ticking and keeps its history in
    memory; once writable, it publishes again and history.json holds the ticks of the outage too."""
    caplog.set_level(logging.INFO)
    paths = Paths(data_dir=tiny_fs, email=AGG)
    write_peer_reports(paths, T0, seed=3)
    agg = Aggregator(paths, Settings(aggregator=AGG), Problems(logging.getLogger("cpu_tracker.aggregator")))
    ticks = [T0 + timedelta(seconds=10 * i) for i in range(12)]
    agg.tick(ticks[0])
    write_peer_reports(paths, ticks[1], seed=4)  # new reports: the next ticks have something to write
    filler = fill(tiny_fs)
    for t in ticks[1:4]:
        agg.tick(t)
    filler.unlink()
    remount(tiny_fs, "ro")
    try:
        for t in ticks[4:8]:
            agg.tick(t)
    finally:
        remount(tiny_fs, "rw")
    for t in ticks[8:]:
        write_peer_reports(paths, t, seed=3)
        agg.tick(t)
    AggregatorAudit(paths).check()
    hist = History.model_validate_json(paths.history_file.read_bytes())
    assert hist == agg.history, "ticks of the outage lost"
    assert {int(t.timestamp()) for t in ticks[1:8]} <= set(hist.recent.t)  # unpublished ticks are retried
    assert read_history(paths.public_dir())[1].recent.t == hist.recent.t
    current = Current.model_validate_json((paths.public_dir() / CURRENT_FILE).read_bytes())
    assert current.generated_at == ticks[-1]
    for needle in ("No space left", "Read-only file system"):
        assert_each_logged_once(caplog, needle)


def test_member_repairs_what_it_owns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Folders deleted, permission files removed or edited to grant everyone read, a file where the report
    folder should be: each is logged, repaired (or waited out) and the member resumes by itself. A report
    is never written into a folder whose permission files are not in order."""
    caplog.set_level(logging.INFO)
    paths = Paths(data_dir=tmp_path, email=ME)
    settings = member_settings()
    member = new_member(paths, settings)
    audit = MemberAudit(paths, settings)
    wall = FakeWall(T0)
    folder = paths.report_dir()
    expected = permission_files(ME, [AGG])
    assert all(drive(member, wall, 2))

    def perms_ok() -> bool:
        return all((folder / n).read_bytes() == b for n, b in expected.items())

    # edited to grant everyone read / removed
    (folder / "syftperm.yaml").write_text("- path: '**'\n  user: '*'\n  permissions: [read]\n")
    (folder / "syft.pub.yaml").write_text("terminal: false\nrules:\n- pattern: '**'\n  access: {read: ['*']}\n")
    assert all(drive(member, wall, 1)) and perms_ok()
    (folder / "syft.pub.yaml").unlink()
    assert all(drive(member, wall, 1)) and perms_ok()
    assert len([m for m in messages(caplog) if m.startswith("repaired")]) == 2
    # the report folder, then the whole datasite, deleted
    shutil.rmtree(folder)
    assert all(drive(member, wall, 1)) and perms_ok()
    shutil.rmtree(paths.my_datasite)
    assert all(drive(member, wall, 1)) and perms_ok()
    # a file where the report folder should be: nothing published, no budget spent, logged once
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    spent = len(load_spends(paths.ledger_file))
    assert not any(drive(member, wall, 3))
    assert len(load_spends(paths.ledger_file)) == spent
    assert len([m for m in messages(caplog) if "is a file; remove it" in m]) == 1
    folder.unlink()
    assert all(drive(member, wall, 1)) and perms_ok()
    # a folder where a permission file should be: the report must not go out without its permissions
    (folder / "syftperm.yaml").unlink()
    (folder / "syftperm.yaml").mkdir()
    before = paths.report_file().read_bytes()
    assert not any(drive(member, wall, 2))
    assert paths.report_file().read_bytes() == before
    (folder / "syftperm.yaml").rmdir()
    assert all(drive(member, wall, 1)) and perms_ok()
    audit.check()
    assert any("permissions in order again" in m for m in messages(caplog))


def test_deleted_private_folder_keeps_the_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The private folder (ledger and raw file) is deleted while the member runs: the ledger is written back
    from memory before the next release, so the spent budget is never forgotten, even across a restart."""
    paths = Paths(data_dir=tmp_path, email=ME)
    settings = member_settings(budgets=(Budget(horizon_s=3600, epsilon=20.0),))
    member = new_member(paths, settings)
    wall = FakeWall(T0)
    assert all(drive(member, wall, 3))  # 15 of the 20 per hour
    recorded = load_spends(paths.ledger_file)
    shutil.rmtree(paths.private)
    assert all(drive(member, wall, 1))  # 20: the hour is now spent
    assert load_spends(paths.ledger_file)[:3] == recorded, "releases forgotten after the folder was deleted"
    assert len(load_spends(paths.ledger_file)) == 4
    assert any("lost 3 release" in m for m in messages(caplog))
    assert not any(drive(member, wall, 2))
    restarted = new_member(paths, settings)
    assert not any(drive(restarted, wall, 5)), "a restart after the deletion overspent the hourly budget"
    MemberAudit(paths, settings).check()


def test_aggregator_repairs_what_it_owns(tmp_path: Path) -> None:
    """The public folder deleted or its permissions edited, the private folder deleted: the next tick puts
    back the permissions, schemas, page and dashboard, and writes history.json again from memory."""
    paths = Paths(data_dir=tmp_path, email=AGG)
    write_peer_reports(paths, T0, seed=5)
    agg = Aggregator(paths, Settings(aggregator=AGG), Problems(logging.getLogger("cpu_tracker.aggregator")))
    agg.tick(T0)
    public = paths.public_dir()
    first = {p.relative_to(public): p.read_bytes() for p in public.rglob("*") if p.is_file()}
    shutil.rmtree(public)
    shutil.rmtree(paths.private)
    agg.tick(T0 + timedelta(seconds=10))  # nothing changed: everything is put back as it was, nothing added
    assert {p.relative_to(public): p.read_bytes() for p in public.rglob("*") if p.is_file()} == first
    (public / "syftperm.yaml").write_text("- path: '**'\n  user: '*'\n  permissions: [read, write, admin]\n")
    (public / "syft.pub.yaml").unlink()
    agg.tick(T0 + timedelta(seconds=20))
    assert {p.relative_to(public): p.read_bytes() for p in public.rglob("*") if p.is_file()} == first
    hist = History.model_validate_json(paths.history_file.read_bytes())
    assert hist == agg.history and len(hist.recent.t) == 1
    AggregatorAudit(paths).check()
    for name in (DASHBOARD_SCHEMA_FILE, REPORT_SCHEMA_FILE):
        assert (public / name).exists()


# ---------------------------------------------------------------------------------------------------
# Clock trouble
# ---------------------------------------------------------------------------------------------------
class ScriptedWall:
    """A wall clock that returns T0 + the given offsets (seconds), one per call, then keeps stepping 20 s."""

    def __init__(self, offsets: list[float]):
        self.offsets = list(offsets)
        self.last = offsets[-1]

    def __call__(self) -> datetime:
        if self.offsets:
            self.last = self.offsets.pop(0)
        else:
            self.last += 20
        return T0 + timedelta(seconds=self.last)


@pytest.mark.parametrize("step_back_s", [1, 60, 300, 3600])
def test_member_clock_stepped_back_never_overspends(tmp_path: Path, step_back_s: int,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The member's clock steps back (by a second up to an hour), twice: the loop does not crash, the window
    that spans the step is not released (logged once), and the windows that re-use time already spent are
    charged again: no budget is exceeded, the third pass over the same instants is refused."""
    settings = member_settings(interval_s=20.0)
    paths = Paths(data_dir=tmp_path, email=ME)
    forward = [20.0 * i for i in range(12)]
    back = forward[-1] - step_back_s
    offsets = [*forward, *[back + 20 * i for i in range(12)], *[back - step_back_s + 20 * i for i in range(40)]]
    stop, read = stop_after(len(offsets), lambda i: 40.0)
    member = new_member(paths, settings)
    run_member(member, stop, read=read, wall=ScriptedWall(offsets), clock=FakeClock(step=20.0))
    audit = MemberAudit(paths, settings)
    audit.check()
    spends = load_spends(paths.ledger_file)
    assert len(spends) >= 11
    assert len([m for m in messages(caplog) if "clock went back" in m]) == 2
    instants = worst_spans(spends, 0.0)
    assert instants <= 10.0 + 1e-9  # the default budget of any single instant


def test_member_clock_ahead_then_back_keeps_its_ledger(tmp_path: Path) -> None:
    """The clock jumps a day ahead for a few windows, then back: releases continue, every budget holds over
    all the releases, and the jump's long window is charged, not lost."""
    settings = member_settings(interval_s=20.0)
    paths = Paths(data_dir=tmp_path, email=ME)
    offsets = [20.0 * i for i in range(10)] + [86400.0 + 20 * i for i in range(5)] + [200.0 + 20 * i for i in range(30)]
    stop, read = stop_after(len(offsets), lambda i: 40.0)
    run_member(Member(paths, settings, Problems(logging.getLogger("m"))), stop, read=read,
               wall=ScriptedWall(offsets), clock=FakeClock(step=20.0))
    audit = MemberAudit(paths, settings)
    audit.check()
    assert audit.seen.total() >= 35


def _skewed_agg(tmp_path: Path) -> tuple[Aggregator, Paths]:
    paths = Paths(data_dir=tmp_path, email=AGG)
    write_peer_reports(paths, T0, seed=9, peers=PEERS[:1])
    return Aggregator(paths, Settings(aggregator=AGG, min_members=1), Problems(logging.getLogger("a"))), paths


def test_aggregator_clock_stepped_back_does_not_keep_dead_members(tmp_path: Path) -> None:
    agg, _ = _skewed_agg(tmp_path)
    assert agg.tick(T0).counts.fresh == 1
    back = T0 - timedelta(hours=1)  # the aggregator's clock is corrected back by an hour; the member has died
    stale_after = agg.settings.stale_after_s
    assert agg.tick(back + timedelta(seconds=stale_after + 1)).counts.fresh == 0


def test_aggregator_clock_stepped_back_keeps_history_ordered(tmp_path: Path) -> None:
    agg, _ = _skewed_agg(tmp_path)
    agg.tick(T0)
    agg.tick(T0 + timedelta(seconds=10))
    hist = agg.tick(T0 - timedelta(hours=1)).history
    assert hist.recent.t == sorted(set(hist.recent.t)) and hist.coarse.t == sorted(set(hist.coarse.t))
