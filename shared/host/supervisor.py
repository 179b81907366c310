"""The supervisor ``run.sh`` starts (``python -m shared.host.runner ROLE_MODULE...``): one per datasite, standard
library only, so that it stays small (about 13 MB) while the worker it keeps running carries the roles and their
libraries.

Its loop wakes every ``WATCH_S`` to see whether it must stop (a signal, its parent gone) and runs whichever of its
small jobs is due, each a ``Job`` with its own period:

- ``KeepWorker``: the worker runs; one that exits is started again after a delay that grows while it keeps dying;
- ``WatchFiles``: one file-stamp watcher (``FileStamps``) over the code, the pins, ``run.sh`` and the settings file:
  new code means "start again from run.sh", new pins first ``PrepareEnv``, new settings a new worker; an app whose
  entry left ``apps/`` stops for good;
- ``PrepareEnv``: the environment for new pins, built while the running version goes on;
- ``Chore``: the environment record (hourly) and the removal of unused environments (daily), each in a short-lived
  child process (``python -m shared.host.envs``) so that what they import never stays in the supervisor.

The module docstring of ``shared.host.runner`` says what the whole process promises.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from io import BufferedReader  # not typing (0.6 MB more in the supervisor)

from shared import __version__
from shared.host.envs import current_env
from shared.logs import LogSink, Problems, setup_logging, write_raw
from shared.paths import SETTINGS_FILE, Paths
from shared.host.runner import (CONFIG_VAR, PARENT_VAR, RESTART_S, ClientConfig, ClientConfigError, Parent, app_dir,
                                load_client_config, parser, private_tree_ready, wait_for_lock)

log = logging.getLogger("cpu_tracker")
WATCH_S = 1.0  # how often the loop checks its parent and runs the jobs that are due
FILES_POLL_S = 2.0  # how often the file stamps are read
CODE_SETTLE_S = 1.0  # a change is acted on once the files have been still this long (a git pull writes many)
RESTART_AFTER_SIGTERM_S = 2.0  # also the time the client has to go away when the whole group is signalled
WORKER_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # a worker that keeps dying within a minute waits longer
WORKER_STEADY_S = 60.0  # a worker that ran this long counts as healthy again
WORKER_STOP_GRACE_S = 15.0
ENV_RETRY_S = 600.0
RECORD_EVERY_S = 3600.0
GC_FIRST_S, GC_EVERY_S = 600.0, 86400.0
PINS = "pyproject.toml"


# -- the file-stamp watcher ----------------------------------------------------------------------------------
def code_files(folder: Path, packages: Sequence[str]) -> list[str]:
    """The files whose change means a new version, by path relative to ``folder``: ``run.sh``, ``pyproject.toml``
    (the pins) and the ``*.py`` under ``packages`` (``__pycache__`` and hidden folders left out)."""
    found = ["run.sh", PINS]
    for package in sorted(packages):
        for dirpath, dirnames, filenames in os.walk(folder / package):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            found += [os.path.relpath(os.path.join(dirpath, n), folder) for n in sorted(filenames) if n.endswith(".py")]
    return found


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class FileStamps:
    """(mtime_ns, size) of the watched files: ``code_files`` plus ``extra`` names in ``folder``. The package folders
    are listed again only when one of them changed (a file added, removed or renamed), so a poll is one ``stat``
    per file and per folder, with no directory listing."""

    def __init__(self, folder: Path, packages: Sequence[str], extra: Sequence[str] = ()):
        self.folder, self.packages, self.extra = Path(folder), tuple(packages), tuple(extra)
        self._dirs: dict[str, tuple[int, int] | None] = {}
        self._files: list[str] = []

    def _listing_stale(self) -> bool:
        return not self._dirs or any(_stamp(d) != stamp for d, stamp in self._dirs.items())

    def _list(self) -> None:
        roots = [str(self.folder / p) for p in self.packages]
        self._dirs = {root: _stamp(root) for root in roots}
        for root in roots:
            for dirpath, dirnames, _ in os.walk(root):
                dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
                self._dirs.update({os.path.join(dirpath, d): _stamp(os.path.join(dirpath, d)) for d in dirnames})
        self._files = [*code_files(self.folder, self.packages), *self.extra]

    def read(self) -> dict[str, tuple[int, int]]:
        """The stamp of every watched file that exists, by path relative to the folder."""
        if self._listing_stale():
            self._list()
        stamps = {}
        for rel in self._files:
            stamp = _stamp(os.path.join(self.folder, rel))
            if stamp is not None:
                stamps[rel] = stamp
        return stamps


class CodeWatch:
    """Notices a change of the watched files (``FileStamps``) once they have been still for ``settle_s``."""

    def __init__(self, folder: Path, packages: Sequence[str], settle_s: float = CODE_SETTLE_S,
                 extra: Sequence[str] = ()):
        self.files = FileStamps(folder, packages, extra)
        self.settle_s = settle_s
        self.base = self.files.read()
        self._pending: dict | None = None
        self._since = 0.0

    def poll(self, now: float) -> list[str]:
        """The files changed since the last reported change (empty while nothing changed or files still move)."""
        current = self.files.read()
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


# -- the jobs ------------------------------------------------------------------------------------------------
class Job:
    """A small task of the supervisor's loop: ``run(now)`` is called once ``now >= due``; it sets its next ``due``
    and returns why the loop must end ("update", "removed") or None."""

    due = 0.0

    def run(self, now: float) -> str | None:
        raise NotImplementedError


def _worker_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


class KeepWorker(Job):
    """Keeps one worker running: started at once, and again after each exit, later while it keeps dying."""

    def __init__(self, spawn: Callable[[], subprocess.Popen], problems: Problems):
        self.spawn, self.problems = spawn, problems
        self.proc: subprocess.Popen | None = None
        self.started, self.failures = 0.0, 0

    def run(self, now: float) -> None:
        self.due = now + WATCH_S
        if self.proc is None:
            self.proc, self.started = self.spawn(), now
        elif self.proc.poll() is not None:
            ran = now - self.started
            self.failures = 0 if ran > WORKER_STEADY_S else self.failures + 1
            delay = WORKER_BACKOFF_S[min(max(self.failures - 1, 0), len(WORKER_BACKOFF_S) - 1)]
            self.problems.report("worker", f"the worker exited with {_worker_exit(self.proc.returncode)} "
                                 f"after {ran:.0f} s; starting it again in {delay:g} s")
            self.proc, self.due = None, now + delay
        elif now - self.started > WORKER_STEADY_S:
            self.problems.clear("worker", "the worker runs again")

    def stop(self) -> None:
        """Stop the worker (SIGTERM, SIGKILL after ``WORKER_STOP_GRACE_S``); the next ``run`` starts a new one."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(WORKER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("the worker (pid %d) did not stop within %g s: killing it", proc.pid, WORKER_STOP_GRACE_S)
            proc.kill()
            proc.wait()


class PrepareEnv(Job):
    """Once asked (new pins on disk), builds their environment with ``run.sh env runtime`` while this version keeps
    running, and ends the loop with "update" when it is ready; a failed build is retried every ``ENV_RETRY_S``."""

    due = float("inf")

    def __init__(self, folder: Path, watch: CodeWatch, problems: Problems, env: dict[str, str]):
        self.folder, self.watch, self.problems, self.env = folder, watch, problems, env
        self.build: subprocess.Popen | None = None
        self.built_for: tuple | None = None

    @property
    def pending(self) -> bool:
        return self.due != float("inf")

    def request(self, now: float) -> None:
        if not self.pending:
            self.due = now

    def run(self, now: float) -> str | None:
        self.due = now + WATCH_S
        if self.build is None:
            self.problems.report("env-build", "pyproject.toml changed: preparing its environment while this version "
                                 "keeps running", logging.INFO)  # said once, however many retries
            self.built_for = self.watch.base.get(PINS)
            self.build = subprocess.Popen(["sh", str(self.folder / "run.sh"), "env", "runtime"], cwd=self.folder,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          env=self.env)
            return None
        if self.build.poll() is None:
            return None
        out = self.build.communicate()[0].decode(errors="replace").strip()
        code, self.build = self.build.returncode, None
        if code == 0 and self.watch.base.get(PINS) != self.built_for:
            return None  # the pins changed again while it was built: build for the new ones
        if code == 0:
            log.info("environment ready (%s): restarting into the new version", (out.splitlines() or ["?"])[-1])
            return "update"
        self.problems.report("env", f"preparing the new environment failed ({out[-500:]}); the running version goes "
                             f"on, retrying in {ENV_RETRY_S:g} s")
        self.due = now + ENV_RETRY_S
        return None


class WatchFiles(Job):
    """Reads the file stamps every ``FILES_POLL_S``: new code ends the loop ("update"), new pins ask ``PrepareEnv``
    first, a new settings file starts a new worker (it reads them at start), an uninstalled app ends the loop."""

    def __init__(self, watch: CodeWatch, worker: KeepWorker, pins: PrepareEnv, installed: Callable[[], bool]):
        self.watch, self.worker, self.pins, self.installed = watch, worker, pins, installed

    def run(self, now: float) -> str | None:
        self.due = now + FILES_POLL_S
        if not self.installed():
            return "removed"
        changed = self.watch.poll(now)
        code = [name for name in changed if name != SETTINGS_FILE]
        if code:
            shown = ", ".join(code[:5]) + (f" and {len(code) - 5} more" if len(code) > 5 else "")
            log.info("the app's code changed on disk (%s)", shown)
            if PINS not in code and not self.pins.pending:
                return "update"
            self.pins.request(now)  # restart once the environment for the pins now on disk is ready
        elif changed:
            log.info("%s changed: starting the worker again with the new settings", SETTINGS_FILE)
            self.worker.stop()
            self.worker.due = now
        return None


class Chore(Job):
    """A command run now and then in a child process (so that what it imports never stays in the supervisor): first
    at ``first``, then every ``every_s``. Its output goes to the log; a failure is said once, until one succeeds."""

    def __init__(self, name: str, argv: list[str], first: float, every_s: float, problems: Problems,
                 env: dict[str, str], cwd: Path):
        self.name, self.argv, self.every_s, self.problems, self.env, self.cwd = name, argv, every_s, problems, env, cwd
        self.due, self.started = first, first
        self.proc: subprocess.Popen | None = None

    def run(self, now: float) -> None:
        if self.proc is None:
            self.started, self.due = now, now + WATCH_S
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            return
        if self.proc.poll() is None:
            self.due = now + WATCH_S
            return
        out, code = self.proc.communicate()[0], self.proc.returncode
        self.proc, self.due = None, self.started + self.every_s
        if code == 0:
            write_raw(out)
            self.problems.clear(self.name)
        else:
            text = out.decode(errors="replace").strip()[-500:]
            self.problems.report(self.name, f"{self.name} failed ({_worker_exit(code)}): {text}")


# -- the supervisor ------------------------------------------------------------------------------------------
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
    return paths.log_file if entry is not None and entry.is_symlink() else None


class Supervisor:
    """See the module docstrings. ``run()`` returns the exit code, or does not return (a restart execs run.sh).
    ``clock`` is the monotonic clock the jobs are timed with."""

    def __init__(self, modules: Sequence[str], argv: list[str], *, clock: Callable[[], float] = time.monotonic):
        self.modules, self.argv, self.clock = list(modules), list(argv), clock
        self.args = parser("cpu_tracker").parse_args(argv)
        self.folder = app_dir()
        saved = os.environ.pop(PARENT_VAR, "")
        self.parent = Parent(int(saved) if saved.isdigit() else None)
        self.packages = sorted({m.split(".")[0] for m in self.modules} | {"shared"})
        self.code = CodeWatch(self.folder, self.packages, extra=(SETTINGS_FILE,))  # at once: changes from here on
        self.stop = threading.Event()
        self.signals: list[str] = []
        self.problems = Problems(log)
        self.worker = KeepWorker(self._spawn, self.problems)
        self.jobs: list[Job] = []  # once the workspace is known (jobs_for)
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

    def _client_config(self) -> ClientConfig | None:
        """The SyftBox client config, waiting for a readable one (it may appear later); None on a stop."""
        while True:
            try:
                return load_client_config(self.args.config)
            except ClientConfigError as e:
                self.problems.report("config", f"cannot load the SyftBox client config "
                                     f"({self.args.config or os.environ.get(CONFIG_VAR)}): {e}; "
                                     f"retrying every {RESTART_S:g} s", logging.ERROR)
            if self.stop.wait(RESTART_S) or self.parent.gone():
                return None

    def run(self) -> int:
        setup_logging()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        client = self._client_config()
        if client is None:
            return self._finish(self._reason())
        paths = client.workspace()
        self.entry = apps_entry(paths, self.folder)
        own_log = log_file_if_shared(paths, self.entry)
        if own_log is not None:
            log.info("the app folder %s is shared through a symlink: logging for %s to %s", self.folder,
                     paths.email, own_log)
            setup_logging(sink=LogSink(path=own_log))
        if not private_tree_ready(paths, self.stop):
            return self._finish(self._reason())
        lock = wait_for_lock(paths.supervisor_lock_file, self.stop, self.parent, "instance")
        if lock is None:
            return self._finish(self._reason())
        try:
            reason = self._supervise(paths, client.server_url)
        finally:
            self.worker.stop()
            lock.close()
        return self._finish(reason)

    def _reason(self) -> str:
        if self.parent.gone():
            return "parent"
        if not self._installed():
            return "removed"
        return self.signals[-1] if self.signals else "request"

    def jobs_for(self, paths: Paths, now: float) -> list[Job]:
        """The loop's jobs for the datasite at ``paths``, starting at ``now``, in the order they run when several are
        due."""
        pins = PrepareEnv(self.folder, self.code, self.problems, self._child_env())
        jobs: list[Job] = [self.worker, WatchFiles(self.code, self.worker, pins, self._installed), pins]
        self.code.files.read()  # the folders are listed once now: the first poll is a stat per file
        env = current_env()
        if env is not None:
            envs = [sys.executable, "-m", "shared.host.envs"]
            record = [*envs, "record", str(env), str(self.folder), str(paths.data_dir), "--pid", str(os.getpid())]
            clean = [*envs, "clean", str(env)]
            jobs += [Chore("env-record", record, now, RECORD_EVERY_S, self.problems, self._child_env(), self.folder),
                     Chore("env-clean", clean, now + GC_FIRST_S, GC_EVERY_S, self.problems, self._child_env(),
                           self.folder)]
        return jobs

    def _supervise(self, paths: Paths, relay: str) -> str:
        env = current_env()
        log.info("cpu_tracker %s starting for %s from %s (environment %s, scheduler pid %d, relay %s)", __version__,
                 paths.email, self.folder, env.name if env else sys.prefix, self.parent.pid, relay)
        self.jobs = self.jobs_for(paths, self.clock())
        while True:
            if reason := self.step(self.clock()):
                return reason
            if self.stop.wait(WATCH_S) or self.parent.gone():
                return self._reason()

    def step(self, now: float) -> str | None:
        """Run the jobs due at ``now``; why the loop must end ("update", "removed"), or None."""
        for job in self.jobs:
            if now >= job.due and (reason := job.run(now)):
                return reason
        return None

    def _child_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k != PARENT_VAR}

    def _spawn(self) -> subprocess.Popen:
        argv = [sys.executable, "-m", "shared.host.runner", *self.modules, *self.argv, "--worker"]
        proc = subprocess.Popen(argv, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=self._child_env())
        threading.Thread(target=_relay, args=(proc.stdout,), name="relay", daemon=True).start()
        return proc

    def _wait_for_the_group(self) -> str:
        """After SIGTERM: a client that is being stopped with us (same process group) goes first; the reason."""
        deadline = self.clock() + RESTART_AFTER_SIGTERM_S
        while self.clock() < deadline and not self.parent.gone() and self._installed():
            time.sleep(0.1)
        return self._reason() if self.parent.gone() or not self._installed() else "SIGTERM"

    def _finish(self, reason: str) -> int:
        if reason == "SIGTERM":
            reason = self._wait_for_the_group()
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
            env[CONFIG_VAR] = str(Path(self.args.config).absolute())
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


def _relay(pipe: BufferedReader) -> None:
    """Copy the worker's output, line by line, to wherever this process logs."""
    for line in iter(pipe.readline, b""):
        write_raw(line)
    pipe.close()


def supervise(modules: Sequence[str], argv: list[str]) -> int:
    return Supervisor(modules, argv).run()
