"""The app's life under the real syftbox 0.4.0 scheduler: a relay server and 3 clients on 127.0.0.1.

- ``a``: its own copy of the app (8 s windows): SIGTERMed (the app and its worker), its code edited, its client
  SIGTERMed and started again;
- ``b`` and ``c``: one checkout installed into both with ``syftbox app install`` (a symlink each), 5 s windows;
  ``c`` is then uninstalled (its symlink removed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from shared.paths import Paths
from tests.localnet.demo import app_env, copy_app
from tests.localnet.network import LocalNetwork

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[1]
A, B, C = "a@example.org", "b@example.org", "c@example.org"
AGG = "agg@example.org"  # not on this network: members publish for it all the same
INTERVAL_A = 8.0


def checkout(dest: Path, settings: str) -> Path:
    """A clean copy of the app's files, as a user's checkout would hold them."""
    copy_app(dest)
    (dest / "cpu_tracker.toml").write_text(settings)
    return dest


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    app_env()
    with LocalNetwork(root / "net", Path(sys.prefix) / "bin", [A, B, C], log=lambda _: None) as n:
        n.install_app(REPO, symlink=False, emails=[A],
                      files={"cpu_tracker.toml": f'aggregator = "{AGG}"\ninterval_s = {INTERVAL_A}\n'})
        shared = checkout(root / "cpu_tracker", f'aggregator = "{AGG}"\ninterval_s = 5\n')
        n.install_app(shared, emails=[B, C])  # `syftbox app install <folder>`: a symlink in each client's apps/
        yield n


def paths(net: LocalNetwork, email: str) -> Paths:
    return Paths(net.sites[email].data_dir, email)


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def supervisors(net: LocalNetwork, email: str) -> dict[int, int]:
    """pid -> parent pid of every live cpu_tracker supervisor started by ``email``'s client (old runs included)."""
    return {pid: ppid for pid, (ppid, cmd) in net.app_processes(email).items()
            if "shared.host.runner" in cmd and "--worker" not in cmd}


def workers(net: LocalNetwork, email: str) -> list[int]:
    return [pid for pid, (_, cmd) in net.app_processes(email).items() if "--worker" in cmd]


def ledger(p: Paths) -> list[tuple[str, str]]:
    try:
        lines = p.ledger_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    # every release; the line that records the ledger's longest horizon is not one
    return [(d["window_start"], d["window_end"]) for d in map(json.loads, lines) if "window_start" in d]


def report(p: Paths) -> dict | None:
    try:
        return json.loads(p.report_file().read_text())
    except (OSError, ValueError):
        return None


def assert_ledger_sound(before: list[tuple[str, str]], after: list[tuple[str, str]]) -> None:
    """Nothing recorded was lost, nothing recorded twice, windows back to back or later, never overlapping."""
    assert after[: len(before)] == before, "releases recorded before the restart were lost or rewritten"
    assert len(set(after)) == len(after), "a release was recorded twice"
    for (_, end), (start, _) in zip(after, after[1:]):
        assert start >= end, f"overlapping windows {end} > {start}"


def test_two_datasites_sharing_one_symlinked_app_folder_run_independently(net):
    b, c = paths(net, B), paths(net, C)
    assert all((net.sites[e].apps / "cpu_tracker").is_symlink() for e in (B, C))
    for p in (b, c):
        net.wait_for(lambda: len(ledger(p)) >= 2, 90, what=f"two releases of {p.email}")
    assert len(supervisors(net, B)) == 1 and len(supervisors(net, C)) == 1
    assert pid_in(b.private / "supervisor.lock") != pid_in(c.private / "supervisor.lock")
    for p, other in ((b, C), (c, B)):
        own = p.private / "logs" / "cpu_tracker.log"  # each its own log: the shared app log would be clobbered
        text = own.read_bytes()
        assert b"\0" not in text and f"starting for {p.email}".encode() in text and other.encode() not in text
        assert report(p)["window"]["n_samples"] == 5  # 5 s windows: 5 one-second units


def test_uninstalling_one_of_them_stops_it_for_good_and_leaves_the_other_running(net):
    b, c = paths(net, B), paths(net, C)
    net.wait_for(lambda: supervisors(net, C) and supervisors(net, B), 60, what="both shared apps")
    (net.sites[C].apps / "cpu_tracker").unlink()  # the symlink only: the checkout stays, b still runs from it
    net.wait_for(lambda: not net.app_processes(C), 20, what="c's app to stop")
    time.sleep(6)  # more than one scheduler period: nothing starts it again
    assert not net.app_processes(C) and len(supervisors(net, B)) == 1
    assert "stopped for good: the app was uninstalled" in (c.private / "logs" / "cpu_tracker.log").read_text()
    released = len(ledger(b))
    net.wait_for(lambda: len(ledger(b)) > released, 30, what="b to publish on")


def test_sigterm_to_the_app_or_its_worker_brings_it_back_without_losing_a_release(net):
    a = paths(net, A)
    net.wait_for(lambda: len(ledger(a)) >= 2, 90, what="two releases of a")
    for target in ("worker", "app"):
        (sup,) = supervisors(net, A)
        (worker,) = workers(net, A)
        before = ledger(a)
        killed = time.monotonic()
        os.kill(worker if target == "worker" else sup, signal.SIGTERM)
        net.wait_for(lambda: (w := workers(net, A)) and w != [worker], 30,
                     what=f"a new worker after SIGTERM to the {target}")
        net.wait_for(lambda: len(ledger(a)) > len(before), 30, what=f"a release after SIGTERM to the {target}")
        back = time.monotonic() - killed
        assert back < 30, f"published again {back:.1f} s after SIGTERM to the {target}"
        assert list(supervisors(net, A)) == [sup]  # the scheduler still sees the process it started
        after = ledger(a)
        assert_ledger_sound(before, after)
        assert report(a)["window"]["end"].startswith(after[-1][1][:19])  # the report is the last recorded release
        print(f"published again {back:.1f} s after SIGTERM to the {target}")
    log = (net.sites[A].apps / "cpu_tracker" / "logs" / "cpu_tracker.log").read_text()
    assert "stopped cleanly on SIGTERM" in log and "Traceback" not in log


def test_an_edit_of_the_code_runs_within_two_windows(net):
    a = paths(net, A)
    net.wait_for(lambda: report(a), 90, what="a report of a")
    app_log = net.sites[A].apps / "cpu_tracker" / "logs" / "cpu_tracker.log"
    init = net.sites[A].apps / "cpu_tracker" / "shared" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "9.9.9+edited"', init.read_text()))
    edited = time.monotonic()
    before = ledger(a)
    net.wait_for(lambda: "cpu_tracker 9.9.9+edited starting for" in app_log.read_text(), 2 * INTERVAL_A,
                 what="the edited code to run")
    running = time.monotonic() - edited
    # its first report follows one window (and the first release's import of diffprivlib) later
    net.wait_for(lambda: (report(a) or {}).get("app_version", "").startswith("9.9.9+"), 2 * INTERVAL_A + 10,
                 what="a report from the edited code")
    took = time.monotonic() - edited
    print(f"edited code running {running:.1f} s and its first report {took:.1f} s after the edit "
          f"({INTERVAL_A:g} s windows)")
    assert_ledger_sound(before, ledger(a))
    assert len(supervisors(net, A)) == 1


def test_client_restart_leaves_exactly_one_instance_the_new_one(net):
    a = paths(net, A)
    net.wait_for(lambda: len(supervisors(net, A)) == 1, 60, what="a's app")
    (old,) = supervisors(net, A)
    stopped = time.monotonic()
    net.stop_client(A)
    net.wait_for(lambda: not net.app_processes(A), 20, what="the orphaned app to stop")
    orphan_gone = time.monotonic() - stopped
    before = ledger(a)
    restarted = time.monotonic()
    net.start_client(A)
    client = net.client_pid(A)
    net.wait_for(lambda: list(supervisors(net, A).values()) == [client], 30, what="one app, started by the new client")
    one = time.monotonic() - restarted
    net.wait_for(lambda: len(ledger(a)) > len(before), 30, what="a release from the new instance")
    print(f"orphan gone {orphan_gone:.1f} s after SIGTERM to the client; the new client's app up {one:.1f} s "
          f"after its start, publishing {time.monotonic() - restarted:.1f} s after it")
    (new,) = supervisors(net, A)
    assert new != old and len(workers(net, A)) == 1
    log = (net.sites[A].apps / "cpu_tracker" / "logs" / "cpu_tracker.log").read_bytes()
    assert b"\0" not in log  # no orphan writing at its old offset into the log the new client truncated
    assert_ledger_sound(before, ledger(a))
