"""The app's life under its scheduler, without a network: the supervisor started through run.sh in a copy of the
app (a fake workspace), its worker stopped and restarted, code edited under it, its parent killed; the code watch,
the environment records and their clean-up, the hourly summaries."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.host.envs import collect_unused, record_use
from shared.logs import Hourly, LogSink
from shared.paths import Paths
from shared.settings import Settings, settings_warnings
from shared.host.supervisor import CodeWatch, code_files
from tests.localnet.demo import PACKAGES, app_env, copy_app

REPO = Path(__file__).resolve().parents[1]


def workspace(root: Path, email: str = "m@x.org") -> tuple[Path, Paths]:
    config = root / "config.json"
    config.write_text(json.dumps({"data_dir": str(root / "data"), "email": email,
                                  "server_url": "http://127.0.0.1:1", "client_url": "http://127.0.0.1:2"}))
    return config, Paths(root / "data", email)


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def report_epsilon(paths: Paths) -> float | None:
    try:
        return json.loads(paths.report_file().read_text())["release"]["epsilon"]
    except (OSError, ValueError, KeyError):
        return None


def report_version(paths: Paths) -> str | None:
    try:
        return json.loads(paths.report_file().read_text())["app_version"]
    except (OSError, ValueError, KeyError):
        return None


# -- the supervisor, for real (a subprocess started through run.sh) -----------------------------------------------
@pytest.fixture
def app(tmp_path):
    """A copy of the app started by ``sh run.sh`` under an intermediate shell (standing in for the SyftBox client)
    that we can kill: yields (app folder, paths, the shell's Popen, the log file)."""
    app_env()  # built once, outside the timeouts below
    folder = copy_app(tmp_path / "app")
    config, paths = workspace(tmp_path)
    log_file = tmp_path / "app.log"
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "SYFTBOX_CLIENT_CONFIG_PATH":
           str(config), "CPU_TRACKER_AGGREGATOR": "a@x.org", "CPU_TRACKER_INTERVAL_S": "2"}
    with open(log_file, "wb") as out:
        # the shell stays as the app's parent (no exec), like the client that started run.sh
        client = subprocess.Popen(["sh", "-c", "sh run.sh; echo exited $? >> exit.txt"], cwd=folder, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield folder, paths, client, log_file
    finally:
        try:
            os.killpg(client.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        client.wait()
        for lock in (paths.private / "supervisor.lock", paths.lock_file):
            pid = pid_in(lock)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def supervisor_pid(paths: Paths) -> int | None:
    pid = pid_in(paths.private / "supervisor.lock")
    return pid if alive(pid) else None


def worker_pid(paths: Paths) -> int | None:
    pid = pid_in(paths.lock_file)
    return pid if alive(pid) and pid != supervisor_pid(paths) else None


def test_supervised_app_restarts_stopped_workers_new_code_and_sigterm_then_leaves_with_its_parent(app):
    folder, paths, client, log_file = app
    sup = wait_until(lambda: supervisor_pid(paths), 60, "the supervisor")
    first = wait_until(lambda: worker_pid(paths), 60, "the worker")
    wait_until(lambda: report_version(paths), 60, "a first report")

    # a SIGTERMed worker comes back within seconds, under the same supervisor
    os.kill(first, signal.SIGTERM)
    second = wait_until(lambda: (w := worker_pid(paths)) and w != first and w, 30, "a new worker")
    assert supervisor_pid(paths) == sup

    # an edit of the code: the new version runs (its reports say so) within two windows of the change settling
    init = folder / "shared" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "9.9.9+edited"', init.read_text()))
    edited = time.monotonic()
    wait_until(lambda: (report_version(paths) or "").startswith("9.9.9+"), 30, "a report of the new version")
    took = time.monotonic() - edited
    assert supervisor_pid(paths) == sup  # restarted in place: the scheduler still sees the pid it started
    assert worker_pid(paths) not in (first, second)

    # new pins: the environment is prepared (here: found ready, the pins' hash is unchanged) before the restart
    before = worker_pid(paths)
    with open(folder / "pyproject.toml", "a") as f:
        f.write("# a comment: same pins, same environment\n")
    wait_until(lambda: (w := worker_pid(paths)) and w != before, 30, "a worker after the pins changed")
    assert "environment ready" in log_file.read_text()

    # SIGTERM to the app itself: stops cleanly, starts again (same pid, as exec'd run.sh), publishes again
    before = worker_pid(paths)
    os.kill(sup, signal.SIGTERM)
    wait_until(lambda: (w := worker_pid(paths)) and w != before, 30, "a worker after SIGTERM")
    assert supervisor_pid(paths) == sup

    # the parent (the client) dies: the app and its worker stop by themselves
    worker = worker_pid(paths)
    os.kill(client.pid, signal.SIGKILL)
    wait_until(lambda: not alive(sup) and not alive(worker), 20, "the orphaned app to stop")
    text = log_file.read_text()
    for needle in ("the worker exited with", "the app's code changed on disk (shared/__init__.py)",
                   "pyproject.toml changed: preparing its environment while this version keeps running",
                   "stopped cleanly on SIGTERM; starting again", "client that started us", "is gone"):
        assert needle in text, needle
    assert "Traceback" not in text
    assert took < 30, f"new code published {took:.1f} s after the edit"  # the real network test times it


def test_a_changed_settings_file_reaches_the_supervised_worker(app):
    """The README promises settings changes are picked up within seconds: under the supervisor, which watches the
    settings file, as when the roles run directly."""
    folder, paths, client, log_file = app
    sup = wait_until(lambda: supervisor_pid(paths), 60, "the supervisor")
    wait_until(lambda: report_epsilon(paths), 60, "a first report")
    assert report_epsilon(paths) == 5.0
    (folder / "cpu_tracker.toml").write_text("epsilon = 4.0\n")
    changed = time.monotonic()
    wait_until(lambda: report_epsilon(paths) == 4.0, 30, "a report at the new epsilon")
    print(f"a report at the new epsilon {time.monotonic() - changed:.1f} s after the change (2 s windows)")
    assert supervisor_pid(paths) == sup and "cpu_tracker.toml changed" in log_file.read_text()


def test_sigint_is_a_deliberate_stop_and_exits_0(app):
    folder, paths, client, log_file = app
    sup = wait_until(lambda: supervisor_pid(paths), 60, "the supervisor")
    worker = wait_until(lambda: worker_pid(paths), 60, "the worker")
    os.kill(sup, signal.SIGINT)
    wait_until(lambda: (folder / "exit.txt").exists(), 30, "run.sh to exit")
    assert (folder / "exit.txt").read_text().strip() == "exited 0"
    assert not alive(worker)
    assert "stopped for good on SIGINT" in log_file.read_text()


def test_a_second_start_waits_for_the_live_instance(app, tmp_path):
    folder, paths, client, log_file = app
    sup = wait_until(lambda: supervisor_pid(paths), 60, "the supervisor")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", ""), "SYFTBOX_CLIENT_CONFIG_PATH":
           str(tmp_path / "config.json"), "CPU_TRACKER_AGGREGATOR": "a@x.org"}
    second = subprocess.Popen(["sh", "run.sh"], cwd=folder, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            second.wait(8)  # it neither exits 0 for ever nor starts a second worker: it waits
        assert supervisor_pid(paths) == sup
    finally:
        second.send_signal(signal.SIGINT)
        out = second.communicate(timeout=30)[0].decode()
    assert "waiting for it to stop" in out and second.returncode == 0


# -- pieces --------------------------------------------------------------------------------------------------------
def test_code_watch_reports_a_change_once_the_files_are_still(tmp_path):
    folder = copy_app(tmp_path / "app")
    watch = CodeWatch(folder, PACKAGES, settle_s=2)
    assert watch.poll(0) == []
    (folder / "cpu_tracker_member" / "member.py").write_text("# new\n")
    (folder / "cpu_tracker_member" / "__pycache__").mkdir(exist_ok=True)
    (folder / "cpu_tracker_member" / "__pycache__" / "x.py").write_text("")  # ignored
    assert watch.poll(10) == []  # just seen: may still be moving
    assert watch.poll(11) == []
    assert watch.poll(12) == ["cpu_tracker_member/member.py"]
    assert watch.poll(20) == []  # reported once
    (folder / "pyproject.toml").write_text("changed")
    (folder / "README.md").write_text("not code")
    assert watch.poll(30) == [] and watch.poll(33) == ["pyproject.toml"]
    assert "README.md" not in code_files(folder, PACKAGES)


def _env(root: Path, name: str, age_s: float, now: float) -> Path:
    env = root / name
    (env / "bin").mkdir(parents=True)
    (env / ".ready").touch()
    for p in (env / ".ready", env):
        os.utime(p, (now - age_s, now - age_s))
    (root / f"requirements-{name[4:]}.txt").write_text("x\n")
    return env


def test_unused_environments_are_removed_and_used_ones_never(tmp_path):
    now = time.time()
    root = tmp_path / "envs"
    day = 86400
    mine = _env(root, "env-mine", 30 * day, now)
    old = _env(root, "env-old", 30 * day, now)
    recent = _env(root, "env-recent", 2 * day, now)
    recorded = _env(root, "env-recorded", 30 * day, now)
    running = _env(root, "env-running", 30 * day, now)
    stale_record = _env(root, "env-stale-record", 30 * day, now)
    record_use(root, recorded, tmp_path / "app1", tmp_path / "data1", now=now - 3 * day)
    record_use(root, stale_record, tmp_path / "app2", tmp_path / "data2", now=now - 8 * day)
    proc = tmp_path / "proc"  # a fake /proc: one process runs from env-running
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cmdline").write_bytes(f"{running}/bin/python\0-m\0pytest\0".encode())
    (proc / "4242" / "maps").write_bytes(b"")

    removed = collect_unused(root, keep=mine, now=now, proc=proc)

    assert sorted(removed) == ["env-old", "env-stale-record"]
    assert not old.exists() and not (root / "requirements-old.txt").exists()
    assert all(p.exists() for p in (mine, recent, recorded, running))
    assert len(list((root / "in-use").glob("*.json"))) == 1  # the stale record went with its env


def test_no_environment_is_removed_while_one_is_being_built(tmp_path):
    import fcntl

    now = time.time()
    root = tmp_path / "envs"
    old = _env(root, "env-old", 30 * 86400, now)
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert collect_unused(root, now=now, proc=tmp_path) == []
    assert old.exists()
    assert collect_unused(root, now=now, proc=tmp_path) == ["env-old"]


def test_hourly_summary_is_one_line_an_hour(caplog):
    caplog.set_level(logging.INFO)
    hourly = Hourly(logging.getLogger("t"), lambda totals, now: f"{totals['n']:.0f} in the hour ending {now:.0f}")
    for t in range(0, 3 * 3600 + 1, 20):
        hourly.add(float(t), n=1)
    assert [r.getMessage() for r in caplog.records] == [
        "181 in the hour ending 3600", "180 in the hour ending 7200", "180 in the hour ending 10800"]


def test_member_logs_nothing_per_window_at_the_default_level(tmp_path, caplog, settings):
    from cpu_tracker_member.member import Member, run_member
    from shared.logs import Problems
    from tests.conftest import FakeClock, FakeWall

    caplog.set_level(logging.INFO)
    stop = __import__("threading").Event()
    reads = iter(range(400))

    def read() -> float:
        if next(reads) >= 399:
            stop.set()
        return 5.0

    quick = Settings(aggregator=settings.aggregator, interval_s=1.0, epsilon=0.25)  # fake clock: 1 s windows
    member = Member(Paths(tmp_path, "m@x.org"), quick, Problems(logging.getLogger("cpu_tracker.member")))
    run_member(member, stop, read=read, clock=FakeClock(1.0), wall=FakeWall(step=20.0))
    said_at_start = set(settings_warnings(quick))  # about the settings, once, before any window
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.getMessage() not in said_at_start]
    assert len(lines) == 2 and all(line.startswith("last hour: ") for line in lines), lines
    assert "of 1000 per 3600 s" in lines[0]


def test_log_sink_file_is_capped_with_one_older_generation(tmp_path):
    sink = LogSink(path=tmp_path / "logs" / "app.log", max_bytes=1000)
    for i in range(100):
        sink.write(f"line {i:03d} ".encode() + b"x" * 40 + b"\n")
    sink.close()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["app.log", "app.log.1"]
    assert all(p.stat().st_size <= 1000 + 60 for p in (tmp_path / "logs").iterdir())
    assert b"line 099" in (tmp_path / "logs" / "app.log").read_bytes()


def test_the_ledger_keeps_only_retained_releases_in_memory_and_compacts_its_file(tmp_path):
    from shared.privacy.ledger import Ledger, Spend
    from shared.privacy import Budget

    budgets = (Budget(horizon_s=0, epsilon=1.0), Budget(horizon_s=600, epsilon=100.0))  # retention 600 s + 1 h
    ledger = Ledger(tmp_path / "ledger.jsonl", budgets)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    retained = int((600 + 3600) / 20)
    for i in range(3 * retained + 300):
        end = t0 + timedelta(seconds=20 * (i + 1))
        ledger.admit(Spend(released_at=end, window_start=end - timedelta(seconds=20), window_end=end, epsilon=0.5,
                           mechanism="laplace", unit="cpu_second", n_samples=20))
        assert len(ledger.spends) <= retained + 101
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(lines) <= 2 * retained + 101 + 1  # and the line that records the longest horizon
    assert [s.window_end for s in ledger.spends] == sorted(s.window_end for s in ledger.spends)
    reopened = Ledger(tmp_path / "ledger.jsonl", budgets)  # everything within retention survived
    assert reopened.spends[-len(ledger.spends):] == ledger.spends
