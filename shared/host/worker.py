"""The worker: the roles the settings select for this datasite, each role's loop in a thread.

The supervisor (``shared.host.supervisor``) starts it as ``python -m shared.host.runner ROLE_MODULE... --worker``;
``--once`` and ``python -m cpu_tracker_member`` / ``cpu_tracker_aggregator`` run it directly. Under the supervisor the
worker only runs the roles: the supervisor watches the settings file and starts a new worker when it changes. Run
directly, it re-reads the settings itself when their file changes (checked every ``SETTINGS_POLL_S``).
A role is imported only when the settings select it, so a member's worker never loads the aggregator's libraries.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from io import TextIOWrapper
from pathlib import Path

from shared.atomic import remove_stale_temps
from shared.logs import Problems, setup_logging
from shared.paths import HISTORY_DIR, Paths
from shared.host.runner import (EX_TEMPFAIL, RESTART_S, ClientConfigError, Parent, Role, acquire_lock, app_dir,
                                load_workspace, lock_holder, parser, private_tree_ready, wait_for_lock)
from shared.settings import SETTINGS_FILE, Settings, SettingsError, load_settings

log = logging.getLogger("cpu_tracker")
SETTINGS_POLL_S = 10.0
PARENT_POLL_S = 1.0


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


def run_roles(paths: Paths, settings: Settings, stop: threading.Event, *, roles: Sequence[Role],
              once: bool) -> list[str]:
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


def role_name(role: Role | str) -> str:
    """A role's name; for a role module's name, its last part (``cpu_tracker_member.member``: ``member``)."""
    return role.name if isinstance(role, Role) else role.rsplit(".", 1)[-1]


def load_role(role: Role | str) -> Role:
    """The role itself: a ``Role`` as given, or the ``ROLE`` of the named module, imported now."""
    if isinstance(role, Role):
        return role
    loaded = importlib.import_module(role).ROLE
    if loaded.name != role_name(role):
        raise ValueError(f"{role} holds the role {loaded.name!r}: a role module is named after its role")
    return loaded


def _log_level(settings: Settings) -> int:
    return logging.getLevelName(settings.log_level.upper())


def main(argv: list[str] | None, *, roles: Sequence[Role | str], prog: str = "cpu_tracker",
         forced_role: str | None = None) -> int:
    """Run those of ``roles`` (``Role`` objects, or the names of their modules: imported only when selected) that
    the settings select for this datasite until SIGTERM / SIGINT (or until our parent is gone); the exit code: 0
    after a stop on a signal, 2 for a bad client config (or bad settings with ``--once``), 75 when another instance
    holds the datasite (direct runs; a worker waits for it instead)."""
    args = parser(prog, forced_role).parse_args(argv)
    setup_logging()
    parent = Parent()
    try:
        paths = load_workspace(args.config)
    except ClientConfigError as e:
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
    if not private_tree_ready(paths, stop, once=args.once):
        return 2 if args.once else 0
    lock, code = _instance_lock(paths, args.worker, stop, parent)
    if lock is None:
        return code
    for owned in (paths.report_dir(), paths.public_dir(), paths.public_dir() / HISTORY_DIR, paths.ledger_file.parent,
                  paths.history_file.parent):
        remove_stale_temps(owned)  # left by a kill mid-write: with the lock held, no one else is writing there
    threading.Thread(target=_watch_parent, args=(parent, stop), name="parent", daemon=True).start()
    try:
        once = _run(paths, args, {role_name(role): role for role in roles}, stop, prog)
    finally:
        lock.close()
    if once is not None:
        return once
    if parent.gone():
        log.info("stopped: the process that started us (pid %d) is gone", parent.pid)
    else:
        log.info("stopped cleanly on %s", signals[0] if signals else "request")
    return 0


def _instance_lock(paths: Paths, worker: bool, stop: threading.Event,
                   parent: Parent) -> tuple[TextIOWrapper | None, int]:
    """The datasite's instance lock, or None and the exit code: a worker waits for it (0 if stopped first), a direct
    run does not start a second instance (75: try again later)."""
    if worker:
        return wait_for_lock(paths.lock_file, stop, parent, "worker"), 0
    lock = acquire_lock(paths.lock_file)
    if lock is None:
        log.info("another cpu_tracker instance (pid %s) already runs for %s; not starting a second one",
                 lock_holder(paths.lock_file), paths.email)
    return lock, EX_TEMPFAIL


def _run(paths: Paths, args: argparse.Namespace, available: dict[str, Role | str], stop: threading.Event,
         prog: str) -> int | None:
    """The roles, run again with each new settings (or, after an unexpected error, ``RESTART_S`` later) until
    ``stop``; with ``--once`` one run and its exit code (None otherwise)."""
    folder = app_dir()
    problems = Problems(log)
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
        chosen = _chosen(paths, settings, args.role, available, problems, prog)
        run_stop = threading.Event()  # the supervisor watches a worker's settings file and starts a new worker
        threading.Thread(target=_watch, args=(folder, stamp, stop, run_stop, not args.worker), daemon=True).start()
        failed = run_roles(paths, settings, run_stop, roles=chosen, once=args.once)
        run_stop.set()
        if args.once:
            return 1 if failed else 0
        if failed:
            stop.wait(RESTART_S)
        elif not stop.is_set():
            log.info("settings changed: restarting with the new settings")
    return None


def _chosen(paths: Paths, settings: Settings, forced: str | None, available: dict[str, Role | str],
            problems: Problems, prog: str) -> list[Role]:
    """The roles the settings select that this program runs (imported now), said in the log."""
    selected = settings.roles(paths.email, forced)
    chosen = [load_role(available[name]) for name in sorted(selected) if name in available]
    if len(chosen) < len(selected):
        missing = "+".join(sorted(selected - available.keys()))
        problems.report("roles", f"the settings select role(s) {missing}, "
                        f"which {prog} does not run; start the app through run.sh to run every role")
    log.info("cpu_tracker for %s: roles %s, aggregator %s, epsilon %g per %gs window", paths.email,
             "+".join(r.name for r in chosen) or "none", settings.aggregator, settings.epsilon, settings.interval_s)
    return chosen


def _watch_parent(parent: Parent, stop: threading.Event) -> None:
    while not stop.wait(PARENT_POLL_S):
        if parent.gone():
            stop.set()


def _watch(folder: Path, stamp: tuple, stop: threading.Event, run_stop: threading.Event,
           settings: bool = True) -> None:
    """Set ``run_stop`` when the process must stop or (``settings``) the settings file changes."""
    while not run_stop.is_set():
        if stop.wait(SETTINGS_POLL_S) or (settings and _settings_stamp(folder) != stamp):
            run_stop.set()
