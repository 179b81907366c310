"""Soak: member, aggregator and supervisor memory and log volume over days of releases, on a simulated clock.

Each role runs in its own process, its real loop (``run_member`` / ``run_aggregator``) with its real files
(a workspace on tmpfs when there is one, so the run measures the app, not the disk), but with clocks that
jump: every reading of the member's monotonic clock is one 20 s window later, the aggregator's waits return
at once with its wall clock one tick later. RSS (VmRSS, after a garbage collection) is read after the first
simulated hour (the "fresh start": imports done, first releases made, the shape of a just-started process)
and after 1 and 7 simulated days; log bytes are what the default level (INFO) writes, per simulated day.

The aggregator ticks every 60 s of simulated time (default 10 s) to keep the run short; its history is what
grows, and at 60 s it holds the full 8,640 recent points from day 6 on, so the 7-day figure is its largest
state (recent history full, 7 days of 5-minute history). 5 members rewrite their reports every tick.

    python -m tests.bench.soak --child member|aggregator --days 7 --work DIR   # one role, JSON on stdout
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.bench.common import PYTHON, REPO, Result, Row, child_env, proc_mem_mb, run_child

DAY_S = 86400
RSS_GOAL_MB = 10.0
SUPERVISOR_RSS_GOAL_MB = 1.0  # the supervisor holds no state that grows: its RSS stays flat
LOG_GOAL_BYTES = 50_000
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
AGG = "agg@soak.example.org"
MEMBERS = [f"m{i}@soak.example.org" for i in range(5)]


class ByteCounter(logging.Handler):
    """Counts the bytes the app's log would hold, formatted as shared.logs formats them, by simulated day."""

    def __init__(self, day_of: "callable"):
        super().__init__(logging.INFO)
        from shared.logs import FORMAT

        self.setFormatter(logging.Formatter(FORMAT))
        self.day_of, self.by_day, self.lines = day_of, {}, 0

    def emit(self, record: logging.LogRecord) -> None:
        day = self.day_of()
        self.by_day[day] = self.by_day.get(day, 0) + len(self.format(record).encode()) + 1
        self.lines += 1


def rss_mb() -> float:
    gc.collect()
    return proc_mem_mb()["VmRSS"]


def soak_member(work: Path, days: int) -> dict:
    from cpu_tracker_member.member import Member, run_member
    from shared.logs import Problems
    from shared.paths import Paths
    from shared.settings import Settings

    settings = Settings(aggregator=AGG)
    interval = settings.interval_s
    paths = Paths(work / "data", "member@soak.example.org")
    per_day = int(DAY_S / interval)
    state = {"windows": 0, "mono": 0.0}
    marks: dict[str, float] = {}
    counter = ByteCounter(lambda: int(state["windows"] * interval // DAY_S))
    logging.getLogger().addHandler(counter)
    logging.getLogger().setLevel(logging.INFO)
    stop = threading.Event()
    rng = random.Random(1)
    started = time.perf_counter()

    def clock() -> float:
        state["mono"] += interval  # every reading is one window later: measure_window never waits
        return state["mono"]

    def wall() -> datetime:
        return T0 + timedelta(seconds=state["windows"] * interval)

    def read() -> float:  # psutil.cpu_percent at each window's end (and once to prime it)
        n = state["windows"]
        if n == per_day // 24:
            marks["fresh"] = rss_mb()
        elif n and n % per_day == 0:
            marks[f"day {n // per_day}"] = rss_mb()
            print(f"member: day {n // per_day} after {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if n >= per_day * days:
            stop.set()
        state["windows"] += 1
        return rng.uniform(0, 100)

    run_member(Member(paths, settings, Problems(logging.getLogger("cpu_tracker.member"))), stop, read=read,
               wall=wall, clock=clock)
    return {"rss_mb": marks, "log_bytes_by_day": counter.by_day, "log_lines": counter.lines,
            "windows": state["windows"] - 1, "seconds": time.perf_counter() - started,
            "ledger_lines": sum(1 for _ in paths.ledger_file.open())}


class SimStop(threading.Event):
    """The aggregator loop's stop event: its waits return at once, after ``on_wait`` moved the world on."""

    def __init__(self, on_wait):
        super().__init__()
        self.on_wait = on_wait

    def wait(self, timeout: float | None = None) -> bool:
        self.on_wait()
        return self.is_set()


def soak_aggregator(work: Path, days: int) -> dict:
    from cpu_tracker_aggregator.aggregator import Aggregator, run_aggregator
    from cpu_tracker_member.member import build_report
    from shared.atomic import atomic_write_json
    from shared.logs import Problems
    from shared.paths import Paths
    from shared.settings import Settings

    settings = Settings(aggregator=AGG, role="aggregator", tick_s=60.0)
    member_settings = Settings(aggregator=AGG)
    paths = Paths(work / "data", AGG)
    per_day = int(DAY_S / settings.tick_s)
    state = {"ticks": 0, "now": T0}
    marks: dict[str, float] = {}
    counter = ByteCounter(lambda: int((state["now"] - T0).total_seconds() // DAY_S))
    logging.getLogger().addHandler(counter)
    logging.getLogger().setLevel(logging.INFO)
    rng = random.Random(2)
    started = time.perf_counter()

    def publish_members() -> None:
        end = state["now"]
        for m in MEMBERS:
            _, report = build_report(rng.uniform(0, 100), member_settings.samples_per_window,
                                     end - timedelta(seconds=member_settings.interval_s), end, member_settings)
            atomic_write_json(paths.report_file(m), report.model_dump(mode="json"), durable=False)

    def on_wait() -> None:
        state["ticks"] += 1
        state["now"] += timedelta(seconds=settings.tick_s)
        n = state["ticks"]
        if n == per_day // 24:
            marks["fresh"] = rss_mb()
        elif n % per_day == 0:
            marks[f"day {n // per_day}"] = rss_mb()
            print(f"aggregator: day {n // per_day} after {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if n >= per_day * days:
            stop.set()
        publish_members()

    stop = SimStop(on_wait)
    publish_members()
    run_aggregator(Aggregator(paths, settings, Problems(logging.getLogger("cpu_tracker.aggregator"))), stop,
                   wall=lambda: state["now"])
    return {"rss_mb": marks, "log_bytes_by_day": counter.by_day, "log_lines": counter.lines,
            "ticks": state["ticks"], "seconds": time.perf_counter() - started}


def soak_supervisor(work: Path, days: int) -> dict:
    """The supervisor's real jobs over ``days`` simulated days, one step of its loop per simulated second: its
    file-stamp watcher over a copy of the app, a worker (a stand-in that prints a line a minute through the relay)
    killed every 6 simulated hours and started again, the settings file changed every day (a new worker), the
    environment chores (stand-in commands: the real ones would touch this machine's environments) hourly and daily."""
    import os
    import subprocess

    from shared.logs import setup_logging
    from shared.host.runner import load_client_config
    from shared.host.supervisor import WATCH_S, Chore, Supervisor, _relay
    from tests.localnet.demo import copy_app

    app = copy_app(work / "app")
    config = work / "config.json"
    config.write_text(json.dumps({"data_dir": str(work / "data"), "email": "m@soak.example.org"}))
    os.chdir(app)
    setup_logging()
    sup = Supervisor(["cpu_tracker_member.member", "cpu_tracker_aggregator.aggregator"], ["--config", str(config)])
    stand_in = "import time\nwhile True:\n    print('worker: a line a minute', flush=True)\n    time.sleep(60)"

    def spawn() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", stand_in], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        threading.Thread(target=_relay, args=(proc.stdout,), daemon=True).start()
        return proc

    sup.worker.spawn = spawn
    sup.jobs = sup.jobs_for(load_client_config(str(config)).workspace(), 0.0)
    for job in sup.jobs:
        if isinstance(job, Chore):
            job.argv = [sys.executable, "-c", f"print('{job.name}: done')"]
    marks: dict[str, float] = {}
    started, steps, t = time.perf_counter(), 0, 0.0
    while t < days * DAY_S:
        reason = sup.step(t)
        if reason is not None:
            raise RuntimeError(f"the supervisor's loop ended ({reason}) at simulated second {t:.0f}")
        t, steps = t + WATCH_S, steps + 1
        if t % (6 * 3600) == 0 and sup.worker.proc is not None:
            sup.worker.proc.kill()
        if t % DAY_S == 0:
            (app / "cpu_tracker.toml").write_text(f"# day {t // DAY_S:.0f}\n")
            marks[f"day {t // DAY_S:.0f}"] = rss_mb()
            print(f"supervisor: day {t // DAY_S:.0f} after {time.perf_counter() - started:.0f} s", file=sys.stderr)
        elif t == 3600:
            marks["fresh"] = rss_mb()
    sup.worker.stop()
    return {"rss_mb": marks, "steps": steps, "seconds": time.perf_counter() - started,
            "threads": threading.active_count()}


def _scratch(work: Path) -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else work
    return Path(tempfile.mkdtemp(prefix="cpu_tracker_soak_", dir=base))


def run(ctx) -> Result:
    import shutil
    import subprocess

    days = 1 if ctx.quick else 7
    res = Result("soak", f"Soak: memory and log volume over {days} simulated day(s)")
    procs = {}
    scratch = {}
    for role in ("member", "aggregator", "supervisor"):
        scratch[role] = _scratch(ctx.work)
        argv = [PYTHON, "-m", "tests.bench.soak", "--child", role, "--days", str(days), "--work", str(scratch[role])]
        procs[role] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=child_env(), cwd=REPO)
    figures = {}
    try:
        for role, proc in procs.items():
            out, err = proc.communicate(timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"soak {role} exited {proc.returncode}: {err[-3000:]}")
            figures[role] = json.loads(out.strip().splitlines()[-1])
    finally:
        for path in scratch.values():
            shutil.rmtree(path, ignore_errors=True)
    for role, f in figures.items():
        fresh = f["rss_mb"]["fresh"]
        goal = SUPERVISOR_RSS_GOAL_MB if role == "supervisor" else RSS_GOAL_MB
        for mark in [k for k in f["rss_mb"] if k.startswith("day")]:
            if mark not in ("day 1", f"day {days}"):
                continue
            grew = f["rss_mb"][mark] - fresh
            res.rows.append(Row(f"{role} RSS growth after {mark.replace('day', '').strip()} simulated day(s)", grew,
                                "MB", goal=f"<= {goal:g} MB above the fresh start", met=grew <= goal,
                                note=f"{f['rss_mb'][mark]:.1f} MB vs {fresh:.1f} MB after the first simulated hour"))
        if role == "supervisor":
            continue  # its log: the worker's lines (relayed) and a line per event; the roles' rows count those
        full_days = [b for d, b in f["log_bytes_by_day"].items() if int(d) < days]
        worst = max(full_days) if full_days else 0
        res.rows.append(Row(f"{role} log bytes per simulated day (worst day, default level)", worst, "bytes",
                            goal=f"<= {LOG_GOAL_BYTES:,}", met=worst <= LOG_GOAL_BYTES,
                            note=f"{f['log_lines']} lines in all"))
    res.details = figures
    res.notes += [
        "Real loops and files, simulated clocks: the member makes one release per simulated 20 s window "
        f"({figures['member']['windows']} windows in {figures['member']['seconds']:.0f} s of real time); the "
        f"aggregator ticks every simulated 60 s ({figures['aggregator']['ticks']} ticks in "
        f"{figures['aggregator']['seconds']:.0f} s) reading 5 members whose reports change every tick; the "
        f"supervisor runs its real jobs one loop step per simulated second ({figures['supervisor']['steps']} steps in "
        f"{figures['supervisor']['seconds']:.0f} s) over a copy of the app, with a stand-in worker killed every 6 "
        "simulated hours, a new settings file every day and stand-in environment chores (real child processes).",
        "RSS is VmRSS after gc.collect(), against the process's own RSS after its first simulated hour.",
    ]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.soak")
    p.add_argument("--child", choices=["member", "aggregator", "supervisor"], required=True)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args(argv)
    soak = {"member": soak_member, "aggregator": soak_aggregator, "supervisor": soak_supervisor}[args.child]
    print(json.dumps(soak(args.work, args.days)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
