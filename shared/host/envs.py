"""The shared Python environments under the env root (``~/.cache/cpu_tracker``): who uses which, and removing
the ones nobody uses any more.

``run.sh`` builds ``<root>/env-<key>`` once per set of dependency pins and touches ``env-<key>/.used`` every time
it selects one (the app, ``./run.sh test``, ``bench``, ``demo``). Each running copy of the app also keeps a record
``<root>/in-use/<copy id>.json`` naming its env, refreshed hourly. An env is removed only when **all** hold:

1. it is not the env of the process doing the removal;
2. no record refreshed within ``keep_s`` (7 days) names it (a copy whose client is stopped for a few days keeps
   its env);
3. it was neither built nor selected by ``run.sh`` within ``keep_s`` (``.ready`` and ``.used`` mtimes);
4. no live process of this user has a file of it open or mapped, or names it on its command line
   (``/proc/<pid>/cmdline`` and ``maps``): an env in use right now is never removed, whatever the records say;
5. ``run.sh``'s build lock (``<root>/.lock``) is free: no env is being built at that moment.

Removal renames the env to ``.trash-<name>`` first (one step: a half-deleted env is never selected, since
``run.sh`` checks ``.ready`` inside the env's own name), then deletes it.

The supervisor runs both in a short-lived child process, so that what they import never stays in it:

    python -m shared.host.envs record ENV APP_DIR DATA_DIR --pid PID   # this copy's record, and ENV/.used touched
    python -m shared.host.envs clean ENV                               # remove the unused envs beside ENV (kept)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("cpu_tracker.envs")
KEEP_S = 7 * 86400
RECORDS = "in-use"


def current_env() -> Path | None:
    """The env this interpreter runs from, if it is one of run.sh's (``<root>/env-<key>``)."""
    prefix = Path(sys.prefix)
    return prefix if prefix.name.startswith("env-") and (prefix / ".ready").exists() else None


def record_use(root: Path, env: Path, app_dir: Path, data_dir: Path, *, now: float | None = None,
               pid: int | None = None) -> Path:
    """Write (or refresh) the record in ``root/in-use/`` of the copy at ``app_dir`` serving ``data_dir``, run by
    process ``pid`` (default: this one): which env it runs. Returns the record's path."""
    import hashlib

    from shared.atomic import atomic_write_text

    copy_id = hashlib.sha256(f"{app_dir}\0{data_dir}".encode()).hexdigest()[:16]
    path = Path(root) / RECORDS / f"{copy_id}.json"
    atomic_write_text(path, json.dumps({"env": env.name, "app_dir": str(app_dir), "data_dir": str(data_dir),
                                        "pid": pid or os.getpid(), "updated_at": now or time.time()}) + "\n",
                      durable=False)
    return path


def _recorded(root: Path, now: float, keep_s: float) -> set[str]:
    """Env names named by a record refreshed within ``keep_s``; older records are deleted."""
    names = set()
    for rec in (Path(root) / RECORDS).glob("*.json"):
        try:
            data = json.loads(rec.read_text())
            fresh = now - float(data["updated_at"]) < keep_s
        except (OSError, ValueError, KeyError, TypeError):
            fresh = False  # unreadable: judged by its mtime alone
            try:
                fresh = now - rec.stat().st_mtime < keep_s
            except OSError:
                pass
            data = {}
        if fresh:
            names.add(str(data.get("env", "")))
        else:
            rec.unlink(missing_ok=True)
    return names


def _used_recently(env: Path, now: float, keep_s: float) -> bool:
    for marker in (env / ".used", env / ".ready", env):
        try:
            if now - marker.stat().st_mtime < keep_s:
                return True
        except OSError:
            continue
    return False


def _in_use_by_a_process(env: Path, proc: Path = Path("/proc")) -> bool:
    """True if a live process (that this user may inspect) names ``env`` in its command line or memory maps."""
    needle = os.fsencode(str(env) + "/")
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        for name in ("cmdline", "maps"):
            try:
                data = (entry / name).read_bytes()
            except OSError:  # gone, or another user's
                continue
            if needle in data:  # "<env>/bin/python" on a command line, "<env>/lib/..." in the maps
                return True
    return False


def collect_unused(root: Path, *, keep: Path | None = None, keep_s: float = KEEP_S, now: float | None = None,
                   proc: Path = Path("/proc")) -> list[str]:
    """Remove the envs under ``root`` that nothing uses (the rule in the module docstring); ``keep`` is never
    removed. Returns the names removed. Never raises for a file system problem: it logs and skips."""
    import shutil

    root = Path(root)
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        lock = open(root / ".lock", "a")
    except OSError:
        return removed
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return removed  # an env is being built: try again another day
        for trash in root.glob(".trash-env-*"):
            shutil.rmtree(trash, ignore_errors=True)
        recorded = _recorded(root, now, keep_s)
        for env in sorted(root.glob("env-*")):
            if not env.is_dir() or env.is_symlink() or (keep is not None and env.resolve() == keep.resolve()):
                continue
            if env.name in recorded or _used_recently(env, now, keep_s) or _in_use_by_a_process(env, proc):
                continue
            trash = root / f".trash-{env.name}"
            try:
                env.rename(trash)
            except OSError as e:
                log.warning("could not remove the unused environment %s: %s", env, e)
                continue
            shutil.rmtree(trash, ignore_errors=True)
            (root / f"requirements-{env.name[4:]}.txt").unlink(missing_ok=True)
            removed.append(env.name)
    if removed:
        log.info("removed %d environment(s) no copy of the app has used for %g days: %s", len(removed),
                 keep_s / 86400, ", ".join(removed))
    return removed


def main(argv: list[str] | None = None) -> int:
    """The supervisor's chores (see the module docstring); a failure exits 1 with one line saying why."""
    from shared.logs import setup_logging

    p = argparse.ArgumentParser(prog="python -m shared.host.envs")
    sub = p.add_subparsers(dest="chore", required=True)
    rec = sub.add_parser("record")
    for name in ("env", "app_dir", "data_dir"):
        rec.add_argument(name, type=Path)
    rec.add_argument("--pid", type=int)
    sub.add_parser("clean").add_argument("env", type=Path)
    args = p.parse_args(argv)
    setup_logging()
    if args.chore == "clean":
        collect_unused(args.env.parent, keep=args.env)  # never raises for a file system problem
        return 0
    try:
        record_use(args.env.parent, args.env, args.app_dir, args.data_dir, pid=args.pid)
        os.utime(args.env / ".used")
    except OSError as e:
        print(f"cannot record the environment in use: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
