"""The long-lived process SyftBox starts through ``run.sh``: one instance per datasite, in two processes.

It knows no role by itself: callers hand it ``Role`` objects or name their modules. ``run.sh`` names the role
modules on the command line and each role package's ``__main__`` passes its own, so ``shared`` never imports an app.

    python -m shared.host.runner cpu_tracker_member.member cpu_tracker_aggregator.aggregator \\
        [--config SYFTBOX_CONFIG] [--role member|aggregator|both] [--once]

What ``run.sh`` starts is a small **supervisor** (``shared.host.supervisor``, standard library only) that runs the roles
in a **worker** child process (``shared.host.worker``, also what ``--once`` and ``python -m cpu_tracker_member`` run
directly):

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
  running version keeps publishing; when the settings file changes the worker reloads it;
- it records the environment it uses and removes the ones no copy of the app uses (``shared.host.envs``).

This module holds what both processes share: the command line, ``Role``, the client config, the instance lock
and the parent watch. It imports the standard library only, so the supervisor stays small.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import stat
import sys
import threading
from collections import namedtuple  # not dataclasses or typing: the supervisor imports this module
from io import TextIOWrapper
from pathlib import Path

from shared import APP_NAME
from shared.atomic import ensure_private_dir, secure_private_tree
from shared.logs import Problems
from shared.paths import Paths, email_shape_problem

log = logging.getLogger("cpu_tracker")
RESTART_S = 30.0
PRIVATE_TREE_POLL_S = 10.0  # how often a private folder that needs the user's hand is checked again
EX_TEMPFAIL = 75  # "try again later": a second instance in direct mode
PARENT_VAR = "CPUTRACKER_SCHEDULER_PID"  # the scheduler's pid across a restart into run.sh (not a setting)
CONFIG_VAR = "SYFTBOX_CLIENT_CONFIG_PATH"  # set by SyftBox for every app it starts
DEFAULT_CONFIG = "~/.syftbox/config.json"  # syftbox's own default, and its legacy name beside it
LEGACY_CONFIG_NAME = "client_config.json"
DEFAULT_DATA_DIR = "~/SyftBox"
DEFAULT_SERVER_URL = "https://syftbox.openmined.org"


class Role(namedtuple("Role", "name run")):
    """A role the runner can start: its ``name`` and ``run(paths, settings, stop, once=...)``, which runs its loop
    until ``stop`` is set (``once``: one window or one tick). Each role module defines one as ``ROLE``, and is named
    after it (``cpu_tracker_member.member`` holds the role ``member``), so a worker imports only the roles it runs."""

    __slots__ = ()


def app_dir() -> Path:
    """The app folder: SyftBox runs run.sh with it as the working directory (the Go client also names it)."""
    return Path(os.environ.get("SYFTBOX_APP_DIR") or Path.cwd())


class ClientConfigError(ValueError):
    """The SyftBox client config cannot be read; the message names the file and what is wrong."""


class ClientConfig(namedtuple("ClientConfig", "path data_dir email server_url")):
    """What the app needs of the SyftBox client's ``config.json`` (its ``path``, the absolute ``data_dir``, the
    datasite's ``email``, the relay's ``server_url``), read as syft-core's ``SyftClientConfig`` reads it (other keys
    ignored) with the standard library alone: no SyftBox client is imported or started."""

    __slots__ = ()

    def workspace(self) -> Paths:
        """The datasite's paths."""
        return Paths(data_dir=self.data_dir, email=self.email, app_name=APP_NAME, server_url=self.server_url)


def load_client_config(config: str | None = None, environ: dict[str, str] | None = None) -> ClientConfig:
    """The config at ``config``, else ``$SYFTBOX_CLIENT_CONFIG_PATH``, else ``~/.syftbox/config.json`` (or the legacy
    ``client_config.json`` beside it). ``data_dir`` (alias ``sync_folder``, default ``~/SyftBox``) comes back
    absolute. Raises ClientConfigError."""
    environ = os.environ if environ is None else environ
    path = Path(config or environ.get(CONFIG_VAR) or DEFAULT_CONFIG).expanduser()
    if not path.exists() and (path.parent / LEGACY_CONFIG_NAME).exists():
        path = path.parent / LEGACY_CONFIG_NAME
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ClientConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ClientConfigError(f"{path} holds no JSON object")
    email = data.get("email")
    if not isinstance(email, str) or email_shape_problem(email):
        raise ClientConfigError(f"{path}: email must be the datasite's email, got {email!r}")
    data_dir = data.get("data_dir", data.get("sync_folder", DEFAULT_DATA_DIR))
    if not isinstance(data_dir, str) or not data_dir:
        raise ClientConfigError(f"{path}: data_dir must be a folder, got {data_dir!r}")
    return ClientConfig(path=path, data_dir=Path(data_dir).expanduser().resolve(), email=email,
                        server_url=str(data.get("server_url") or DEFAULT_SERVER_URL))


def load_workspace(config: str | None) -> Paths:
    """The datasite's paths from the SyftBox client config (``--config`` or SYFTBOX_CLIENT_CONFIG_PATH)."""
    return load_client_config(config).workspace()


def acquire_lock(path: Path) -> TextIOWrapper | None:
    """An exclusive lock held for the life of the process, or None if another instance holds it.

    The lock file is 0600 in a 0700 folder whatever the umask, so no other local user can open it, let alone hold it.
    One that another user holds all the same (opened while an older version left it 0644 in a 0755 folder, or
    planted while the folder was open) is not an instance of this app: the file is replaced, and the lock taken on
    the new one."""
    ensure_private_dir(path.parent)
    for _ in range(2):
        f = _open_lock_file(path)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            st = os.fstat(f.fileno())
            f.close()
            strangers = [pid for pid, uid in _flock_holders(st) if uid != os.geteuid()]
            if not strangers:
                return None
            log.warning("%s is held by process %s of another user, not by an instance of this app: replacing the "
                        "lock file", path, ", ".join(map(str, strangers)))
            os.unlink(path)
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f
    return None


def _open_lock_file(path: Path) -> TextIOWrapper:
    """The lock file opened for writing, created 0600: a regular file of this user's, never through a symlink."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():  # planted by another user while the folder was open
        os.close(fd)
        os.unlink(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "r+")


def _flock_holders(st: os.stat_result) -> list[tuple[int, int]]:
    """(pid, uid) of each process holding a flock on the file ``st`` describes, from /proc/locks (Linux; empty
    elsewhere or when unknown)."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev and fields[4].isdigit():
            try:
                out.append((int(fields[4]), os.stat(f"/proc/{fields[4]}").st_uid))
            except OSError:
                continue
    return out


def private_tree_ready(paths: Paths, stop: threading.Event, *, once: bool = False) -> bool:
    """Make ``<data_dir>/private/`` and the app's folder in it safe from other local users (``secure_private_tree``),
    waiting (said once) while that needs the user's hand; False if ``stop`` is set first (or at once with ``once``).
    Nothing starts before: the locks, the ledger and the keys live there."""
    problems = Problems(log)
    while not stop.is_set():
        try:
            secure_private_tree(paths.private.parent, paths.private)
            problems.clear("private-tree", "the private folder is safe again: starting")
            return True
        except OSError as e:
            problems.report("private-tree", f"not starting: {e.filename}: {e.strerror or e}", logging.ERROR)
            if once:
                return False
        stop.wait(PRIVATE_TREE_POLL_S)
    return False


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


def wait_for_lock(path: Path, stop: threading.Event, parent: Parent, what: str) -> TextIOWrapper | None:
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


def parser(prog: str, forced_role: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="SyftBox client config (default: $SYFTBOX_CLIENT_CONFIG_PATH)")
    p.add_argument("--role", choices=["member", "aggregator", "both"], default=forced_role,
                   help="run this role whatever the `role` setting says")
    p.add_argument("--once", action="store_true", help="one window / one tick, then exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    return p


def cli(argv: list[str] | None = None) -> int:
    """``python -m shared.host.runner ROLE_MODULE... [options]``: the role modules first, then the runner's options.
    ``--once`` and ``--worker`` run the roles in this process; otherwise this process supervises a worker."""
    argv = sys.argv[1:] if argv is None else argv
    n = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    if n == 0:
        print("usage: python -m shared.host.runner ROLE_MODULE... [--config C] [--role R] [--once]", file=sys.stderr)
        return 2
    if "--once" in argv[n:] or "--worker" in argv[n:]:
        from shared.host.worker import main

        return main(argv[n:], roles=argv[:n])
    from shared.host.supervisor import supervise

    return supervise(argv[:n], argv[n:])


if __name__ == "__main__":
    sys.exit(cli())
