"""The long-lived process SyftBox starts through ``run.sh``: one instance per datasite, each selected role's
loop in a thread, settings re-read when their file changes.

It knows no role by itself: callers hand it ``Role`` objects. ``run.sh`` names the role modules on the
command line and each role package's ``__main__`` passes its own, so ``shared`` never imports an app.

    python -m shared.runner cpu_tracker_member.member cpu_tracker_aggregator.aggregator \\
        [--config SYFTBOX_CONFIG] [--role member|aggregator|both] [--once]

What ``run.sh`` starts is a small **supervisor** (``supervise``) that runs the roles in a **worker** child
process (``main``, also what ``--once`` and ``python -m cpu_tracker_member`` run directly):

- it never outlives its scheduler: when its parent (the SyftBox client) is gone it stops the worker and exits,
  so a restarted client starts a fresh instance; a second start waits for a live instance to go, it never
  exits for good because of it;
- a worker that stops or crashes is started again within seconds (whatever the scheduler: syftbox 0.4.0
  restarts an app that exits non-zero, the Go client never restarts one);
- SIGTERM stops the worker cleanly and starts the app again from ``run.sh`` (new code included). Only a
  **deliberate stop** ends it: SIGINT (Ctrl-C in the terminal that ran ``./run.sh``), the app removed from
  ``apps/`` (SyftBox then sends SIGTERM), or its client stopped. A deliberate stop exits 0;
- when its own code (``*.py`` of ``shared`` and the role packages, ``run.sh``) or its pins (``pyproject.toml``)
  change on disk it says so and starts again from ``run.sh``, preparing the new environment first while the
  running version keeps publishing;
- it records the environment it uses and removes the ones no copy of the app uses (``shared.envs``).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

from shared import APP_NAME
from shared.atomic import remove_stale_temps
from shared.logs import LogSink, Problems, setup_logging
from shared.paths import HISTORY_DIR, Paths
from shared.settings import SETTINGS_FILE, Settings, SettingsError, load_settings

log = logging.getLogger("cpu_tracker")
SETTINGS_POLL_S = 10.0
RESTART_S = 30.0
WATCH_S = 1.0  # how often the parent, the worker and (every CODE_POLL_S) the code are checked
CODE_POLL_S = 1.0
CODE_SETTLE_S = 1.0  # a change is acted on once the files have been still this long (a git pull writes many)
RESTART_AFTER_SIGTERM_S = 2.0  # also the time the client has to go away when the whole group is signalled
WORKER_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # a worker that keeps dying within a minute waits longer
WORKER_STOP_GRACE_S = 15.0
ENV_RETRY_S = 600.0
RECORD_EVERY_S = 3600.0
GC_FIRST_S, GC_EVERY_S = 600.0, 86400.0
EX_TEMPFAIL = 75  # "try again later": a second instance in direct mode
PARENT_VAR = "CPUTRACKER_SCHEDULER_PID"  # the scheduler's pid across a restart into run.sh (not a setting)


@dataclass(frozen=True)
class Role:
    """A role the runner can start. ``run(paths, settings, stop, once=...)`` runs its loop until ``stop`` is set
    (``once``: one window or one tick). Each role module defines one as ``ROLE``."""

    name: str
    run: Callable[..., None]


def app_dir() -> Path:
    """The app folder: SyftBox runs run.sh with it as the working directory (the Go client also names it)."""
    return Path(os.environ.get("SYFTBOX_APP_DIR") or Path.cwd())


def load_workspace(config: str | None) -> Paths:
    """The datasite's paths from the SyftBox client config (``--config`` or SYFTBOX_CLIENT_CONFIG_PATH)."""
    from syftbox.lib import Client

    client = Client.load(config)
    return Paths(data_dir=Path(client.workspace.data_dir), email=str(client.email), app_name=APP_NAME,
                 server_url=str(client.config.server_url))


def acquire_lock(path: Path) -> IO | None:
    """An exclusive lock held for the life of the process, or None if another instance holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lock_holder(path: Path) -> str:
    """The pid written in a lock file by its holder ("?" if unreadable)."""
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


class Parent:
    """The process that started us. ``gone()`` once it has exited (we were re-parented to init or a subreaper)."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getppid()

    def gone(self) -> bool:
        return os.getppid() != self.pid


def wait_for_lock(path: Path, stop: threading.Event, parent: Parent, what: str) -> IO | None:
    """``acquire_lock``, waiting (and saying so once) while another live instance holds it. None if ``stop`` is set
    or our parent goes first."""
    said = False
    while not stop.is_set() and not parent.gone():
        lock = acquire_lock(path)
        if lock is not None:
            if said:
                log.info("the other instance stopped: starting")
            return lock
        if not said:
            log.info("another cpu_tracker %s (pid %s) runs for this datasite; waiting for it to stop", what,
                     lock_holder(path))
            said = True
        stop.wait(0.5)
    return None


def _settings_stamp(folder: Path) -> tuple:
    try:
        st = (folder / SETTINGS_FILE).stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return ()


def _guarded(target: Callable[..., None], stop: threading.Event, failed: list[str], name: str):
    """Run ``target``; on an unexpected exception log it with its traceback, note ``name``, and stop the run."""

    def run(*args, **kwargs) -> None:
        try:
            target(*args, **kwargs)
        except Exception:
            log.exception("%s stopped by an unexpected error (restarting in %g s)", name, RESTART_S)
            failed.append(name)
            stop.set()

    return run


def run_roles(paths: Paths, settings: Settings, stop: threading.Event, *, roles: Sequence[Role], once: bool) -> list[str]:
    """Run the roles' loops until ``stop`` (``once``: one window / one tick each). Returns the names of the loops
    that failed with an unexpected error (the others are then stopped too)."""
    failed: list[str] = []
    threads = [
        threading.Thread(target=_guarded(role.run, stop, failed, role.name), args=(paths, settings, stop),
                         kwargs={"once": once}, name=role.name, daemon=True)
        for role in roles
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(5.0)  # lock waits are interrupted by signals: SIGTERM still stops us at once
    return failed


def parser(prog: str, forced_role: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="SyftBox client config (default: $SYFTBOX_CLIENT_CONFIG_PATH)")
    p.add_argument("--role", choices=["member", "aggregator", "both"], default=forced_role,
                   help="run this role whatever the `role` setting says")
    p.add_argument("--once", action="store_true", help="one window / one tick, then exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    return p


def _log_level(settings: Settings) -> int:
    return logging.getLevelName(settings.log_level.upper())


def main(argv: list[str] | None, *, roles: Sequence[Role], prog: str = "cpu_tracker",
         forced_role: str | None = None) -> int:
    """Run those of ``roles`` that the settings select for this datasite until SIGTERM / SIGINT (or until our
    parent is gone); the exit code: 0 after a stop on a signal, 2 for a bad client config (or bad settings with
    ``--once``), 75 when another instance holds the datasite (direct runs; a worker waits for it instead)."""
    args = parser(prog, forced_role).parse_args(argv)
    available = {role.name: role for role in roles}
    setup_logging()
    parent = Parent()
    try:
        paths = load_workspace(args.config)
    except Exception as e:  # the syftbox client raises several kinds; all mean the same to the user
        log.error("cannot load the SyftBox client config (%s): %s. Pass --config or set "
                  "SYFTBOX_CLIENT_CONFIG_PATH.", args.config or os.environ.get("SYFTBOX_CLIENT_CONFIG_PATH"), e)
        return 2
    stop = threading.Event()
    signals: list[str] = []

    def on_signal(signum, _frame) -> None:
        signals.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if args.worker:
        lock = wait_for_lock(paths.lock_file, stop, parent, "worker")
        if lock is None:
            return 0
    else:
        lock = acquire_lock(paths.lock_file)
        if lock is None:
            log.info("another cpu_tracker instance (pid %s) already runs for %s; not starting a second one",
                     lock_holder(paths.lock_file), paths.email)
            return EX_TEMPFAIL
    for owned in (paths.report_dir(), paths.public_dir(), paths.public_dir() / HISTORY_DIR, paths.ledger_file.parent,
                  paths.history_file.parent):
        remove_stale_temps(owned)  # left by a kill mid-write: with the lock held, no one else is writing there
    threading.Thread(target=_watch_parent, args=(parent, stop), name="parent", daemon=True).start()
    folder = app_dir()
    problems = Problems(log)
    try:
        while not stop.is_set():
            stamp = _settings_stamp(folder)
            try:
                settings = load_settings(folder)
                problems.clear("settings", "settings valid again")
            except SettingsError as e:
                problems.report("settings", f"{e} (waiting for the settings to be fixed)", logging.ERROR)
                if args.once:
                    return 2
                stop.wait(SETTINGS_POLL_S)
                continue
            logging.getLogger().setLevel(_log_level(settings))
            selected = settings.roles(paths.email, args.role)
            chosen = [available[name] for name in sorted(selected) if name in available]
            if len(chosen) < len(selected):
                missing = "+".join(sorted(selected - available.keys()))
                problems.report("roles", f"the settings select role(s) {missing}, "
                                f"which {prog} does not run; start the app through run.sh to run every role")
            log.info("cpu_tracker for %s: roles %s, aggregator %s, epsilon %g per %gs window", paths.email,
                     "+".join(r.name for r in chosen) or "none", settings.aggregator, settings.epsilon,
                     settings.interval_s)
            run_stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(folder, stamp, stop, run_stop), daemon=True)
            watcher.start()
            failed = run_roles(paths, settings, run_stop, roles=chosen, once=args.once)
            run_stop.set()
            if args.once:
                return 1 if failed else 0
            if failed:
                stop.wait(RESTART_S)
            elif not stop.is_set():
                log.info("settings changed: restarting with the new settings")
    finally:
        lock.close()
    if parent.gone():
        log.info("stopped: the process that started us (pid %d) is gone", parent.pid)
    else:
        log.info("stopped cleanly on %s", signals[0] if signals else "request")
    return 0


def _watch_parent(parent: Parent, stop: threading.Event) -> None:
    while not stop.wait(WATCH_S):
        if parent.gone():
            stop.set()


def _watch(folder: Path, stamp: tuple, stop: threading.Event, run_stop: threading.Event) -> None:
    """Set ``run_stop`` when the process must stop or the settings file changes."""
    while not run_stop.is_set():
        if stop.wait(SETTINGS_POLL_S) or _settings_stamp(folder) != stamp:
            run_stop.set()


def load_roles(modules: Sequence[str]) -> list[Role]:
    """The ``ROLE`` of each named module (``run.sh`` names them: the runner itself imports no app)."""
    return [importlib.import_module(name).ROLE for name in modules]


# -- the supervisor -------------------------------------------------------------------------------------------
def code_files(folder: Path, packages: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of each file whose change means a new version: ``*.py`` under ``packages``, ``run.sh``
    and ``pyproject.toml`` (the pins), by path relative to ``folder``."""
    stamps: dict[str, tuple[int, int]] = {}

    def add(path: Path) -> None:
        try:
            st = path.stat()
        except OSError:
            return
        stamps[str(path.relative_to(folder))] = (st.st_mtime_ns, st.st_size)

    for name in ("run.sh", "pyproject.toml"):
        add(folder / name)
    for package in sorted(packages):
        for dirpath, dirnames, filenames in os.walk(folder / package):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    add(Path(dirpath) / name)
    return stamps


class CodeWatch:
    """Notices a change of the app's own code on disk, once the files have been still for ``settle_s``."""

    def __init__(self, folder: Path, packages: Sequence[str], settle_s: float = CODE_SETTLE_S):
        self.folder, self.packages, self.settle_s = folder, tuple(packages), settle_s
        self.base = code_files(folder, self.packages)
        self._pending: dict | None = None
        self._since = 0.0

    def poll(self, now: float) -> list[str]:
        """The files changed since the last reported change (empty while nothing changed or files still move)."""
        current = code_files(self.folder, self.packages)
        if current == self.base:
            self._pending = None
            return []
        if current != self._pending:
            self._pending, self._since = current, now
            return []
        if now - self._since < self.settle_s:
            return []
        changed = sorted(k for k in current.keys() | self.base.keys() if current.get(k) != self.base.get(k))
        self.base, self._pending = current, None
        return changed


def apps_entry(paths: Paths, folder: Path) -> Path | None:
    """The entry of ``<data_dir>/apps/`` that is this app folder (the folder itself, or a symlink to it as
    ``syftbox app install`` makes), or None when the app runs from elsewhere (started by hand)."""
    try:
        target = folder.resolve()
        return next((e for e in (paths.data_dir / "apps").iterdir() if e.resolve() == target), None)
    except OSError:
        return None


def log_file_if_shared(paths: Paths, entry: Path | None) -> Path | None:
    """Our own log file when the app folder is reached through a symlink in ``apps/`` (``syftbox app install``):
    several datasites may share that folder, and with it SyftBox's app log, which each client truncates at every
    start. None otherwise: SyftBox's app log (our stdout) is ours alone."""
    return paths.private / "logs" / f"{APP_NAME}.log" if entry is not None and entry.is_symlink() else None


def _worker_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


class Supervisor:
    """See the module docstring. ``run()`` returns the exit code, or does not return (a restart execs run.sh)."""

    def __init__(self, modules: Sequence[str], argv: list[str]):
        self.modules, self.argv = list(modules), list(argv)
        self.args = parser("cpu_tracker").parse_args(argv)
        self.folder = app_dir()
        saved = os.environ.pop(PARENT_VAR, "")
        self.parent = Parent(int(saved) if saved.isdigit() else None)
        self.packages = sorted({m.split(".")[0] for m in self.modules} | {"shared"})
        self.code = CodeWatch(self.folder, self.packages)  # at once: what changes from here on is new code
        self.stop = threading.Event()
        self.signals: list[str] = []
        self.problems = Problems(log)
        self.worker: subprocess.Popen | None = None
        self.entry: Path | None = None  # our entry in apps/, once the workspace is known

    def _installed(self) -> bool:
        """False once the app is uninstalled: its entry gone from apps/ (a symlink removed leaves the folder it
        pointed to), or run.sh gone from the folder."""
        if not (self.folder / "run.sh").exists():
            return False
        try:
            return self.entry is None or self.entry.resolve() == self.folder.resolve()
        except OSError:
            return False

    def _on_signal(self, signum, _frame) -> None:
        self.signals.append(signal.Signals(signum).name)
        self.stop.set()

    def run(self) -> int:
        setup_logging()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        while True:
            try:
                paths = load_workspace(self.args.config)
                break
            except Exception as e:  # as in main(): the config may appear later, so keep trying
                self.problems.report("config", f"cannot load the SyftBox client config "
                                     f"({self.args.config or os.environ.get('SYFTBOX_CLIENT_CONFIG_PATH')}): {e}; "
                                     f"retrying every {RESTART_S:g} s", logging.ERROR)
                if self.stop.wait(RESTART_S) or self.parent.gone():
                    return self._finish(self._reason())
        self.entry = apps_entry(paths, self.folder)
        own_log = log_file_if_shared(paths, self.entry)
        if own_log is not None:
            log.info("the app folder %s is shared through a symlink: logging for %s to %s", self.folder,
                     paths.email, own_log)
            setup_logging(sink=LogSink(path=own_log))
        lock = wait_for_lock(paths.private / "supervisor.lock", self.stop, self.parent, "instance")
        if lock is None:
            return self._finish(self._reason())
        try:
            reason = self._supervise(paths)
        finally:
            self._stop_worker()
            lock.close()
        return self._finish(reason)

    def _reason(self) -> str:
        if self.parent.gone():
            return "parent"
        if not self._installed():
            return "removed"
        return self.signals[-1] if self.signals else "request"

    def _supervise(self, paths: Paths) -> str:
        from shared import __version__
        from shared.envs import current_env, record_use

        env = current_env()
        log.info("cpu_tracker %s starting for %s from %s (environment %s, scheduler pid %d)", __version__,
                 paths.email, self.folder, env.name if env else sys.prefix, self.parent.pid)
        code = self.code
        now = time.monotonic()
        restart_at, failures, started = now, 0, now
        next_code, next_record, next_gc = now + CODE_POLL_S, now, now + GC_FIRST_S
        env_build: subprocess.Popen | None = None
        pins_pending, next_env_try, built_for = False, 0.0, None
        while True:
            now = time.monotonic()
            if self.worker is None and now >= restart_at:
                self.worker, started = self._spawn(), now
            if self.stop.wait(WATCH_S) or self.parent.gone() or not self._installed():
                return self._reason()
            now = time.monotonic()
            if self.worker is not None and self.worker.poll() is not None:
                ran = now - started
                failures = 0 if ran > 60 else failures + 1
                delay = WORKER_BACKOFF_S[min(max(failures - 1, 0), len(WORKER_BACKOFF_S) - 1)]
                self.problems.report("worker", f"the worker exited with {_worker_exit(self.worker.returncode)} "
                                     f"after {ran:.0f} s; starting it again in {delay:g} s")
                self.worker, restart_at = None, now + delay
            elif self.worker is not None and now - started > 60:
                self.problems.clear("worker", "the worker runs again")
            if now >= next_code:
                next_code = now + CODE_POLL_S
                changed = code.poll(now)
                if changed:
                    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                    log.info("the app's code changed on disk (%s)", shown)
                    if "pyproject.toml" not in changed and not pins_pending:
                        return "update"
                    pins_pending = True  # restart once the environment for the pins now on disk is ready
            if pins_pending and env_build is None and now >= next_env_try:
                self.problems.report("env-build", "pyproject.toml changed: preparing its environment while this "
                                     "version keeps running", logging.INFO)  # said once, however many retries
                built_for = code.base.get("pyproject.toml")
                env_build = subprocess.Popen(["sh", str(self.folder / "run.sh"), "env", "runtime"], cwd=self.folder,
                                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, env=self._child_env())
            if env_build is not None and env_build.poll() is not None:
                out = env_build.communicate()[0].decode(errors="replace").strip()
                if env_build.returncode == 0 and code.base.get("pyproject.toml") != built_for:
                    env_build = None  # the pins changed again while it was built: build for the new ones
                elif env_build.returncode == 0:
                    log.info("environment ready (%s): restarting into the new version",
                             (out.splitlines() or ["?"])[-1])
                    return "update"
                else:
                    self.problems.report("env", f"preparing the new environment failed ({out[-500:]}); the "
                                         f"running version goes on, retrying in {ENV_RETRY_S:g} s")
                    env_build, next_env_try = None, now + ENV_RETRY_S
            if env is not None and now >= next_record:
                next_record = now + RECORD_EVERY_S
                try:
                    record_use(env.parent, env, self.folder, paths.data_dir)
                    os.utime(env / ".used")
                except OSError as e:
                    self.problems.report("env-record", f"cannot record the environment in use: {e}")
            if env is not None and now >= next_gc:
                next_gc = now + GC_EVERY_S
                threading.Thread(target=self._collect_envs, args=(env,), name="env-gc", daemon=True).start()

    @staticmethod
    def _collect_envs(env: Path) -> None:
        from shared.envs import collect_unused

        try:
            collect_unused(env.parent, keep=env)
        except Exception:  # housekeeping must never stop the app
            log.exception("removing unused environments failed")

    def _child_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k != PARENT_VAR}

    def _spawn(self) -> subprocess.Popen:
        argv = [sys.executable, "-m", "shared.runner", *self.modules, *self.argv, "--worker"]
        proc = subprocess.Popen(argv, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=self._child_env())
        threading.Thread(target=_relay, args=(proc.stdout,), name="relay", daemon=True).start()
        return proc

    def _stop_worker(self) -> None:
        proc, self.worker = self.worker, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(WORKER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("the worker (pid %d) did not stop within %g s: killing it", proc.pid, WORKER_STOP_GRACE_S)
            proc.kill()
            proc.wait()

    def _finish(self, reason: str) -> int:
        if reason == "SIGTERM":
            deadline = time.monotonic() + RESTART_AFTER_SIGTERM_S
            while time.monotonic() < deadline and not self.parent.gone() and self._installed():
                time.sleep(0.1)  # a client that is being stopped with us (same process group) goes first
            reason = self._reason() if self.parent.gone() or not self._installed() else reason
        if reason == "parent":
            log.info("stopped: the SyftBox client that started us (pid %d) is gone; its next start starts a fresh "
                     "instance", self.parent.pid)
            return 0
        if reason == "removed":
            log.info("stopped for good: the app was uninstalled (%s is gone)", self.entry or self.folder / "run.sh")
            return 0
        if reason in ("SIGINT", "request"):
            log.info("stopped for good on %s", reason)
            return 0
        if reason == "SIGTERM":
            log.info("stopped cleanly on SIGTERM; starting again (SIGINT, removing the app or stopping the "
                     "SyftBox client stops it for good)")
        return self._restart()

    def _restart(self) -> int:
        """Start over from run.sh in this very process (the scheduler keeps seeing the pid it started)."""
        env = self._child_env()
        env[PARENT_VAR] = str(self.parent.pid)
        if self.args.config:  # run.sh passes no arguments: carry the command line's over as variables
            env["SYFTBOX_CLIENT_CONFIG_PATH"] = str(Path(self.args.config).absolute())
        if self.args.role:
            env["CPU_TRACKER_ROLE"] = self.args.role
        first, _, rest = env.get("PYTHONPATH", "").partition(":")
        if first == str(self.folder):  # run.sh puts the app folder first again
            env["PYTHONPATH"] = rest
            if not rest:
                del env["PYTHONPATH"]
        sys.stdout.flush()
        logging.shutdown()
        try:
            os.execve("/bin/sh", ["sh", str(self.folder / "run.sh")], env)
        except OSError as e:
            log.error("cannot start %s again: %s", self.folder / "run.sh", e)
            return 1
        return 1  # not reached


def _relay(pipe: IO[bytes]) -> None:
    """Copy the worker's output, line by line, to wherever this process logs."""
    from shared.logs import write_raw

    for line in iter(pipe.readline, b""):
        write_raw(line)
    pipe.close()


def supervise(modules: Sequence[str], argv: list[str]) -> int:
    return Supervisor(modules, argv).run()


def cli(argv: list[str] | None = None) -> int:
    """``python -m shared.runner ROLE_MODULE... [options]``: the role modules first, then the runner's options.
    ``--once`` and ``--worker`` run the roles in this process; otherwise this process supervises a worker."""
    argv = sys.argv[1:] if argv is None else argv
    n = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    if n == 0:
        print("usage: python -m shared.runner ROLE_MODULE... [--config C] [--role R] [--once]", file=sys.stderr)
        return 2
    if "--once" in argv[n:] or "--worker" in argv[n:]:
        return main(argv[n:], roles=load_roles(argv[:n]))
    return supervise(argv[:n], argv[n:])


if __name__ == "__main__":
    sys.exit(cli())
