"""The long-lived process SyftBox starts through ``run.sh``: one instance per datasite, member and/or
aggregator loops in threads, settings re-read when their file changes.

    python -m shared.app [--config SYFTBOX_CONFIG] [--role member|aggregator|both] [--once]
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO

from shared import APP_NAME
from shared.atomic import remove_stale_temps
from shared.logs import Problems, setup_logging
from shared.paths import Paths
from shared.settings import SETTINGS_FILE, Settings, SettingsError, load_settings

log = logging.getLogger("cpu_tracker")
SETTINGS_POLL_S = 10.0
RESTART_S = 30.0


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


def _guarded(target, stop: threading.Event, failed: list[str]):
    """Run ``target``; on an unexpected exception log it with its traceback, note it, and stop the run."""

    def run(*args, **kwargs) -> None:
        try:
            target(*args, **kwargs)
        except Exception:
            log.exception("%s stopped by an unexpected error (restarting in %g s)", target.__name__, RESTART_S)
            failed.append(target.__name__)
            stop.set()

    return run


def run_roles(paths: Paths, settings: Settings, stop: threading.Event, *, roles: set[str], once: bool) -> list[str]:
    """Run the requested roles' loops until ``stop`` (``once``: one window / one tick each). Returns the names
    of the loops that failed with an unexpected error (the others are then stopped too)."""
    threads, failed = [], []
    if "member" in roles:
        import psutil

        from cpu_tracker_member.member import Member, run_member

        member = Member(paths, settings, Problems(logging.getLogger("cpu_tracker.member")))
        threads.append(threading.Thread(
            target=_guarded(run_member, stop, failed), args=(member, stop),
            kwargs={"read": psutil.cpu_percent, "once": once},
            name="member", daemon=True,
        ))
    if "aggregator" in roles:
        from cpu_tracker_aggregator.aggregator import Aggregator, run_aggregator

        agg = Aggregator(paths, settings, Problems(logging.getLogger("cpu_tracker.aggregator")))
        threads.append(threading.Thread(
            target=_guarded(run_aggregator, stop, failed), args=(agg, stop), kwargs={"once": once},
            name="aggregator", daemon=True,
        ))
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(5.0)  # lock waits are interrupted by signals: SIGTERM still stops us at once
    return failed


def roles_for(settings: Settings, email: str, forced: str | None) -> set[str]:
    role = forced or settings.role
    if role == "both":
        return {"member", "aggregator"}
    if role in ("member", "aggregator"):
        return {role}
    return {"member"} | ({"aggregator"} if email == settings.aggregator else set())


def main(argv: list[str] | None = None, *, forced_role: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpu_tracker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="SyftBox client config (default: $SYFTBOX_CLIENT_CONFIG_PATH)")
    parser.add_argument("--role", choices=["member", "aggregator", "both"], default=forced_role)
    parser.add_argument("--once", action="store_true", help="one window / one tick, then exit")
    args = parser.parse_args(argv)
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
            roles = roles_for(settings, paths.email, args.role)
            if "member" in roles:
                _warn_if_rejected(settings)
            log.info("cpu_tracker for %s: roles %s, aggregator %s, epsilon %g per %gs window",
                     paths.email, "+".join(sorted(roles)), settings.aggregator, settings.epsilon, settings.interval_s)
            run_stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(folder, stamp, stop, run_stop), daemon=True)
            watcher.start()
            failed = run_roles(paths, settings, run_stop, roles=roles, once=args.once)
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


def _warn_if_rejected(settings: Settings) -> None:
    """A member whose noise scale exceeds what a default aggregator accepts would publish for nothing."""
    scale = 100.0 / settings.samples_per_window / settings.epsilon
    if scale > settings.max_noise_scale:
        log.warning("noise scale %.3g points (100 / %d samples / epsilon %g) exceeds max_noise_scale %g: an "
                    "aggregator with that limit rejects every report; raise interval_s or epsilon",
                    scale, settings.samples_per_window, settings.epsilon, settings.max_noise_scale)


def _watch(folder: Path, stamp: tuple, stop: threading.Event, run_stop: threading.Event) -> None:
    """Set ``run_stop`` when the process must stop or the settings file changes."""
    while not run_stop.is_set():
        if stop.wait(SETTINGS_POLL_S) or _settings_stamp(folder) != stamp:
            run_stop.set()


if __name__ == "__main__":
    sys.exit(main())
