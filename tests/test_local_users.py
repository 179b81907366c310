"""Private means private: another local user can neither block the member nor make it forget a spend.

The attacks run as a real second local user (created with ``useradd`` for the session, run with ``setpriv``), with
the system's Python and the standard library only, against a SyftBox folder under a world-traversable base (as a
home folder is): under umask 022 it tried to open and hold the app's lock (the 0644 lock in a 0755 folder let it,
and the member then refused to start); under umask 000 it renamed the ledger's folder away (a 0777 private folder
let it, and a restarted member spent a spent budget again). Needs root; skipped, saying so, otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from cpu_tracker_member.member import Member, run_member
from shared.privacy.ledger import load_spends
from shared.logs import Problems
from shared.paths import Paths
from shared.host.runner import acquire_lock, private_tree_ready
from shared.privacy import Budget
from shared.settings import Settings
from tests.conftest import AGG, FakeClock, FakeWall

ME = "me@example.org"
REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"  # the stranger cannot reach the test environment under /root


@pytest.fixture(scope="module")
def stranger():
    """A second local user for this module (removed afterwards): (uid, gid)."""
    if os.geteuid() != 0:
        pytest.skip("creating a second local user needs root (useradd); these attacks were not run")
    if not (shutil.which("useradd") and shutil.which("setpriv") and os.path.exists(SYSTEM_PYTHON)):
        pytest.skip("useradd, setpriv or /usr/bin/python3 missing: the second-user attacks were not run")
    name = f"cpt{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        import pwd

        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False)


def as_stranger(user, code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    uid, gid = user
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", SYSTEM_PYTHON, "-c", code,
                           *args], capture_output=True, text=True, timeout=60, **kw)


@contextmanager
def stranger_holding_the_lock(user, path: Path):
    """The stranger opens ``path`` and holds an exclusive flock on it until the block ends; yields what it managed
    ("held", or the error it got)."""
    uid, gid = user
    code = ("import fcntl, sys, time\n"
            "try:\n"
            "    f = open(sys.argv[1], 'rb')\n"
            "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except OSError as e:\n"
            "    print(type(e).__name__, flush=True); sys.exit(0)\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", SYSTEM_PYTHON, "-c", code,
                             str(path)], stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.fixture
def home():
    """A world-traversable folder like a home folder (0755, owned by the member's user), outside pytest's 0700 tmp."""
    base = Path(tempfile.mkdtemp(prefix="cpu_tracker_users_", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _config(home: Path) -> Path:
    data = home / "SyftBox"
    data.mkdir(mode=0o755, exist_ok=True)
    os.chmod(data, 0o755)
    config = home / "config.json"
    config.write_text(json.dumps({"data_dir": str(data), "email": ME, "server_url": "http://127.0.0.1:1",
                                  "client_url": "http://127.0.0.1:2"}))
    return config


def _run_once(config: Path, app_dir: Path, mask: int, role: str = "member", env: dict | None = None
              ) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(app_dir), "CPU_TRACKER_AGGREGATOR": AGG,
           "CPU_TRACKER_INTERVAL_S": "1", "CPU_TRACKER_MIN_MEMBERS": "1", **(env or {})}
    return subprocess.run(["sh", "-c", f"umask {mask:03o}; exec \"$@\"", "sh", sys.executable, "-m",
                           "shared.host.runner",
                           "cpu_tracker_member.member", "cpu_tracker_aggregator.aggregator", "--config", str(config),
                           "--once", "--role", role], cwd=app_dir, env=env, capture_output=True, text=True, timeout=120)


def test_under_umask_022_another_user_cannot_hold_the_lock(stranger, home) -> None:
    """The app ran once under umask 022; the stranger then tries to open and hold its lock: refused (the folder is
    0700, the lock 0600), and the app starts again. Before: it held the 0644 lock and the app exited 75 ("another
    instance runs") for as long as it liked."""
    config = _config(home)
    first = _run_once(config, home, 0o022)
    assert first.returncode == 0, first.stdout + first.stderr
    paths = Paths(home / "SyftBox", ME)
    with stranger_holding_the_lock(stranger, paths.lock_file) as got:
        assert got == "PermissionError", f"the other user could open the lock file: {got}"
        again = _run_once(config, home, 0o022)
    assert again.returncode == 0 and "already runs" not in again.stdout, again.stdout + again.stderr


def test_a_lock_another_user_holds_from_before_is_replaced(stranger, home, caplog) -> None:
    """An older version left the lock 0644 in a 0755 folder and the stranger opened and holds it: this version
    finds that the holder is not one of its own processes, replaces the lock file and starts."""
    paths = Paths(home / "SyftBox", ME)
    paths.private.mkdir(parents=True)
    for folder in (paths.private.parent, paths.private):
        os.chmod(folder, 0o755)
    paths.lock_file.write_text("123\n")
    os.chmod(paths.lock_file, 0o644)
    with stranger_holding_the_lock(stranger, paths.lock_file) as got:
        assert got == "held"
        stop = threading.Event()
        assert private_tree_ready(paths, stop, once=True)
        lock = acquire_lock(paths.lock_file)
        assert lock is not None, "a lock held by another user kept the app from starting"
        assert acquire_lock(paths.lock_file) is None  # and it is a real lock: a second instance still waits
        lock.close()
    assert "held by process" in caplog.text and "of another user" in caplog.text
    assert stat.S_IMODE(os.stat(paths.lock_file).st_mode) == 0o600


def _member(paths: Paths, hourly_epsilon: float = 5.0) -> Member:
    s = Settings(aggregator=AGG, interval_s=1.0, budgets=(Budget(horizon_s=3600, epsilon=hourly_epsilon),))
    return Member(paths, s, Problems(logging.getLogger("test.users")))


def _window(member: Member, wall: FakeWall) -> None:
    reads = iter([0.0, 42.0])
    run_member(member, threading.Event(), read=lambda: next(reads), wall=wall, clock=FakeClock(1.0), once=True)


def _all_spends(paths: Paths) -> int:
    """Spends recorded in every ledger file under the private folder, wherever it was moved."""
    return sum(len(load_spends(p)) for p in paths.private.rglob("ledger.jsonl"))


def test_under_umask_000_another_user_cannot_make_the_member_forget_a_spend(stranger, home) -> None:
    """The app, started as SyftBox starts it under umask 000, spends a budget of one release an hour; the stranger
    tries to rename the ledger's folder away; the app starts again and the next window is still refused. Before:
    the private folder was 0777, the rename worked, and the restarted app found no ledger and spent the hour's
    budget a second time."""
    config = _config(home)
    paths = Paths(home / "SyftBox", ME)
    budget = {"CPU_TRACKER_BUDGETS": '[{"horizon_s": 3600, "epsilon": 5}]'}
    first = _run_once(config, home, 0o000, env=budget)
    assert first.returncode == 0 and _all_spends(paths) == 1, first.stdout + first.stderr
    moved = as_stranger(stranger, "import os, sys\ntry:\n    os.rename(sys.argv[1], sys.argv[1] + '.gone')\n"
                        "    print('renamed')\nexcept OSError as e:\n    print(type(e).__name__)\n",
                        str(paths.ledger_file.parent))
    again = _run_once(config, home, 0o000, env=budget)
    assert again.returncode == 0, again.stdout + again.stderr
    assert moved.stdout.strip() == "PermissionError", moved.stdout + moved.stderr
    assert _all_spends(paths) == 1, "the budget of one release an hour was spent twice"


def test_a_folder_another_user_planted_stops_releases_with_a_sentence(stranger, home, caplog) -> None:
    """The stranger made the member's ledger folder while the private folder was open (an older version under
    umask 000), with a ledger of its own: the member spends nothing and says which folder to remove."""
    data = home / "SyftBox"
    data.mkdir(mode=0o755)
    paths = Paths(data, ME)
    paths.private.mkdir(parents=True)
    os.chmod(paths.private, 0o777)
    made = as_stranger(stranger, "import os, sys\nos.mkdir(sys.argv[1])\nopen(sys.argv[1] + '/ledger.jsonl', 'w')\n",
                       str(paths.ledger_file.parent))
    assert made.returncode == 0, made.stderr
    _window(_member(paths), FakeWall())
    assert not paths.report_file().exists()
    assert f"{paths.ledger_file.parent} belongs to uid {stranger[0]}" in caplog.text and "remove it" in caplog.text


def test_a_syftbox_folder_others_can_write_stops_releases_with_a_sentence(home, caplog) -> None:
    """SyftBox's own folder made under umask 000 (0777): another user could rename private/ away, ledger and all.
    The member spends nothing and says what to run."""
    data = home / "SyftBox"
    data.mkdir()
    os.chmod(data, 0o777)
    paths = Paths(data, ME)
    _window(_member(paths), FakeWall())
    assert not paths.report_file().exists() and _all_spends(paths) == 0
    assert f"chmod go-w {data}" in caplog.text
    os.chmod(data, 0o755)
    _window(_member(paths), FakeWall())
    assert paths.report_file().exists()


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_private_folders_are_0700_and_private_files_0600_whatever_the_umask(home, mask) -> None:
    """Member and aggregator run once by the runner, as SyftBox starts them, under the umask: every folder from
    <data_dir>/private down is 0700 and no file there is readable by others but the Prometheus textfile (public
    content, in a 0700 folder); the lock, the ledger and every private file are 0600."""
    config = _config(home)
    done = _run_once(config, home, mask, role="both")
    assert done.returncode == 0, done.stdout + done.stderr
    private = home / "SyftBox" / "private"
    seen = []
    for dirpath, dirnames, filenames in os.walk(private):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for name in filenames:
            mode = stat.S_IMODE(os.lstat(Path(dirpath) / name).st_mode)
            seen.append(name)
            assert mode == (0o644 if name.endswith(".prom") and mask != 0o077 else 0o600) or \
                (name.endswith(".prom") and mode & 0o022 == 0), (name, oct(mode))
    assert {"app.lock", "ledger.jsonl", "raw.jsonl", "history.json"} <= set(seen), seen


def test_a_client_record_another_user_forged_stops_releases_with_a_sentence(stranger, home, caplog) -> None:
    """The SyftBox client's plugins folder made under umask 000 (0777): another user replaces the client's record of
    what the relay holds with a forged one (which could hide a grant the relay still holds). The member withdraws
    its report, spends nothing and says what to run; once fixed it publishes again."""
    data = home / "SyftBox"
    data.mkdir(mode=0o755)
    paths = Paths(data, ME)
    member = _member(paths, hourly_epsilon=50.0)
    _window(member, FakeWall())
    assert paths.report_file().exists()
    spent = _all_spends(paths)
    plugins = paths.sync_state_file.parent
    plugins.mkdir(mode=0o777)
    os.chmod(plugins, 0o777)
    forged = as_stranger(stranger, "import json, sys\njson.dump({'states': {}, 'status_info': {}}, open(sys.argv[1], 'w'))\n",
                         str(paths.sync_state_file))
    assert forged.returncode == 0, forged.stderr
    _window(member, FakeWall())
    assert not paths.report_file().exists() and _all_spends(paths) == spent
    assert f"chmod go-w {plugins}" in caplog.text or f"belongs to uid {stranger[0]}" in caplog.text
    paths.sync_state_file.unlink()
    os.chmod(plugins, 0o755)
    _window(member, FakeWall())
    assert paths.report_file().exists() and _all_spends(paths) == spent + 1


@pytest.fixture
def own_group():
    """A group nobody is in, as a user private group is to its user (Debian and Ubuntu, umask 002): its gid."""
    name = f"cpg{secrets.token_hex(4)}"
    subprocess.run(["groupadd", "--system", name], check=True)
    try:
        import grp

        yield grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=False)


def test_a_syftbox_folder_only_its_users_own_group_can_write_is_private_enough(stranger, own_group, home,
                                                                               caplog) -> None:
    """Made under umask 002 (0775) with the user's private group, the SyftBox folder is safe: the member publishes.
    The same folder with a group another user is in is not: the member spends nothing and says what to run."""
    data = home / "SyftBox"
    data.mkdir()
    os.chmod(data, 0o775)
    os.chown(data, -1, own_group)
    paths = Paths(data, ME)
    member = _member(paths, hourly_epsilon=50.0)
    _window(member, FakeWall())
    assert paths.report_file().exists() and _all_spends(paths) == 1
    os.chown(data, -1, stranger[1])  # the stranger's own group: the stranger could rename private/ away
    _window(_member(paths), FakeWall())  # as the app starts again
    assert _all_spends(paths) == 1 and f"chmod go-w {data}" in caplog.text


def _grant_acl(path: Path, uid: int) -> None:
    """A POSIX access ACL letting ``uid`` write ``path`` (what `setfacl -m u:<uid>:rwx` writes): its group bits then
    read as the ACL's mask, rwx, though the owning group may be the user's own."""
    import struct

    undefined = 0xFFFFFFFF
    entries = [(0x01, 7, undefined), (0x02, 7, uid), (0x04, 5, undefined), (0x10, 7, undefined), (0x20, 5, undefined)]
    os.setxattr(path, "system.posix_acl_access", struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e)
                                                                                  for e in entries))


def test_a_syftbox_folder_shared_through_an_acl_is_not_private(stranger, own_group, home, caplog) -> None:
    """0775 with the user's own group, but the group bits are an ACL's mask letting the stranger write: not private."""
    data = home / "SyftBox"
    data.mkdir()
    os.chown(data, -1, own_group)
    try:
        _grant_acl(data, stranger[0])
    except OSError as e:
        pytest.skip(f"this file system takes no ACL ({e}); the case was not run")
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o775
    made = as_stranger(stranger, "import os, sys\nos.mkdir(sys.argv[1])\n", str(data / "planted"))
    assert made.returncode == 0, made.stderr  # the stranger can write there indeed
    paths = Paths(data, ME)
    _window(_member(paths), FakeWall())
    assert _all_spends(paths) == 0 and f"chmod go-w {data}" in caplog.text
