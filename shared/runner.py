"""The long-lived process SyftBox starts through ``run.sh``: one instance per datasite, each selected role's
loop in a thread, settings re-read when their file changes.

It knows no role by itself: callers hand it ``Role`` objects. ``run.sh`` names the role modules on the
command line and each role package's ``__main__`` passes its own, so ``shared`` never imports an app.

    python -m shared.runner cpu_tracker_member.member cpu_tracker_aggregator.aggregator \\
        [--config SYFTBOX_CONFIG] [--role member|aggregator|both] [--once]
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

from shared import APP_NAME
from shared.atomic import remove_stale_temps
from shared.logs import Problems, setup_logging
from shared.paths import Paths
from shared.settings import SETTINGS_FILE, Settings, SettingsError, load_settings

log = logging.getLogger("cpu_tracker")
SETTINGS_POLL_S = 10.0
RESTART_S = 30.0


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
    return Paths(data_dir=Path(client.workspace.data_dir), email=str(client.email), app_name=APP_NAME)


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
    return p


def main(argv: list[str] | None, *, roles: Sequence[Role], prog: str = "cpu_tracker",
         forced_role: str | None = None) -> int:
    """Run those of ``roles`` that the settings select for this datasite until SIGTERM / SIGINT; the exit code."""
    args = parser(prog, forced_role).parse_args(argv)
    available = {role.name: role for role in roles}
    setup_logging()
    try:
        paths = load_workspace(args.config)
    except Exception as e:  # the syftbox client raises several kinds; all mean the same to the user
        log.error("cannot load the SyftBox client config (%s): %s. Pass --config or set "
                  "SYFTBOX_CLIENT_CONFIG_PATH.", args.config or os.environ.get("SYFTBOX_CLIENT_CONFIG_PATH"), e)
        return 2
    lock = acquire_lock(paths.lock_file)
    if lock is None:
        log.info("another cpu_tracker instance already runs for %s; exiting", paths.email)
        return 0
    for owned in (paths.report_dir(), paths.public_dir(), paths.ledger_file.parent, paths.history_file.parent):
        remove_stale_temps(owned)  # left by a kill mid-write: with the lock held, no one else is writing there
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
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
            selected = settings.roles(paths.email, args.role)
            chosen = [available[name] for name in sorted(selected) if name in available]
            if len(chosen) < len(selected):
                problems.report("roles", f"the settings select role(s) {'+'.join(sorted(selected - available.keys()))}, "
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
    return 0


def _watch(folder: Path, stamp: tuple, stop: threading.Event, run_stop: threading.Event) -> None:
    """Set ``run_stop`` when the process must stop or the settings file changes."""
    while not run_stop.is_set():
        if stop.wait(SETTINGS_POLL_S) or _settings_stamp(folder) != stamp:
            run_stop.set()


def load_roles(modules: Sequence[str]) -> list[Role]:
    """The ``ROLE`` of each named module (``run.sh`` names them: the runner itself imports no app)."""
    return [importlib.import_module(name).ROLE for name in modules]


def cli(argv: list[str] | None = None) -> int:
    """``python -m shared.runner ROLE_MODULE... [options]``: the role modules first, then the runner's options."""
    argv = sys.argv[1:] if argv is None else argv
    n = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    if n == 0:
        print("usage: python -m shared.runner ROLE_MODULE... [--config C] [--role R] [--once]", file=sys.stderr)
        return 2
    return main(argv[n:], roles=load_roles(argv[:n]))


if __name__ == "__main__":
    sys.exit(cli())
