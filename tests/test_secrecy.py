"""Secrecy on a real local SyftBox network: a relay server and 6 real clients on 127.0.0.1.

- 3 members and the aggregator run the app through SyftBox's scheduler (run.sh), with real psutil readings;
- a "probe" member runs the real member loop in this process with readings chosen to be unmistakable
  (12 significant digits), so that finding one of its raw means anywhere is proof of a leak, never chance
  (psutil's 1-decimal readings such as 100.0 also appear in every report's bounds); its private folder also
  holds a canary file;
- an "outsider" datasite runs nothing: a third party that asks the relay for everything it can.

Checked: the relay's stored files and database never contain a raw mean, a ledger or raw-file line, the
canary, or any path under a private folder; no member (nor the outsider) ever receives another member's
report, and the relay refuses to serve it to them when asked directly, while serving it to the aggregator;
the public dashboard, wherever it is copied, names no member and carries no member's released value.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from cpu_tracker_member.member import Member, run_member
from tests.localnet.demo import install_tracker, site_paths
from tests.localnet.network import Datasite, LocalNetwork
from shared.logs import Problems
from shared.settings import Settings

pytestmark = pytest.mark.network

MEMBERS = ["m1@example.org", "m2@example.org", "m3@example.org"]
PROBE, OUTSIDER, AGG = "probe@example.org", "outsider@example.org", "agg@example.org"
ALL_MEMBERS = [*MEMBERS, PROBE]
SETTINGS = f'aggregator = "{AGG}"\ninterval_s = 2\ntick_s = 1\nstale_after_s = 10\n'
PROBE_WINDOWS = 6
CANARY = f"canary-{secrets.token_hex(16)}"


def probe_value(i: int) -> float:
    """The probe's i-th raw window mean: 12 significant digits, never a round number."""
    return 37.1234567891 + i * 1.0000001 % 50


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with LocalNetwork(tmp_path_factory.mktemp("secrecy"), Path(sys.prefix) / "bin", [*ALL_MEMBERS, OUTSIDER, AGG],
                      log=lambda _: None) as n:
        install_tracker(n, MEMBERS, AGG, SETTINGS)
        probe = paths(n, PROBE)
        canary = probe.private / "member" / "canary.txt"
        canary.parent.mkdir(parents=True)
        canary.write_text(CANARY)
        stop, count = threading.Event(), iter(range(10**6))
        member = Member(probe, Settings(aggregator=AGG, interval_s=2), Problems(logging.getLogger("probe")))
        thread = threading.Thread(target=run_member, args=(member, stop),
                                  kwargs={"read": lambda: probe_value(next(count))}, daemon=True)
        thread.start()
        try:
            n.wait_for(lambda: (d := dashboard(paths(n, AGG).current_file)) and d["counts"]["fresh"] == 4,
                       timeout=180, what="4 fresh members at the aggregator")
            n.wait_for(lambda: len(paths(n, PROBE).raw_file.read_text().splitlines()) >= PROBE_WINDOWS, timeout=60,
                       what=f"{PROBE_WINDOWS} windows of the probe")
        finally:
            stop.set()
            thread.join(10)
        for _ in range(2):  # every datasite has synced twice since the last report and dashboard were written
            barrier(n)
        yield n


paths = site_paths


def dashboard(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def barrier(net: LocalNetwork) -> None:
    """Return once every datasite holds a new public file of every other datasite: all have synced since."""
    name = f"barrier-{uuid.uuid4().hex}.txt"
    for site in net.sites.values():
        (site.datasites / site.email / "public").mkdir(parents=True, exist_ok=True)
        (site.datasites / site.email / "public" / name).write_text("barrier")
    for reader in net.sites.values():
        for writer in net.sites:
            net.wait_for((reader.datasites / writer / "public" / name).is_file, 60,
                         what=f"{reader.email} to receive {writer}'s barrier")


def relay_blob(net: LocalNetwork) -> bytes:
    stored = [p for p in net.server_files().rglob("*") if p.is_file()] + net.server_db_files()
    return b"\n".join(p.read_bytes() for p in stored if p.exists())


def private_lines(net: LocalNetwork, email: str) -> list[bytes]:
    p = paths(net, email)
    lines = []
    for f in (p.ledger_file, p.raw_file):
        if f.exists():
            lines += [line for line in f.read_bytes().splitlines() if line.strip()]
    return lines


def test_the_relay_stores_nothing_private(net: LocalNetwork) -> None:
    blob = relay_blob(net)
    probe_raws = [json.loads(line)["raw_mean"] for line in paths(net, PROBE).raw_file.read_text().splitlines()]
    assert len(probe_raws) >= PROBE_WINDOWS - 1 and all(len(repr(r)) >= 12 for r in probe_raws)
    assert net.server_files().joinpath(PROBE, "app_data", "cpu_tracker", "cpu_tracker.json").is_file()  # not vacuous
    for raw in probe_raws:
        assert repr(raw).encode() not in blob, f"the probe's raw mean {raw!r} is on the relay"
        assert f"{raw:.6f}".encode() not in blob
    for email in [*ALL_MEMBERS, AGG]:
        lines = private_lines(net, email)
        assert lines or email == AGG
        for line in lines:
            assert line not in blob, f"a line of {email}'s ledger or raw file is on the relay"
    for secret in (CANARY.encode(), b"raw_mean", b"released_at", b'"window_end"', b"ledger.jsonl", b"raw.jsonl",
                   b"members.json", b"history.json", b"canary.txt", b"private/cpu_tracker", b"/private/"):
        assert secret not in blob, f"{secret!r} is on the relay"
    assert not [p for p in net.server_data.rglob("*") if p.name in ("ledger.jsonl", "raw.jsonl", "canary.txt")]


def test_no_member_receives_another_members_report(net: LocalNetwork) -> None:
    for email in [*ALL_MEMBERS, OUTSIDER]:
        mine = paths(net, email)
        for other in ALL_MEMBERS:
            if other != email:
                assert not mine.report_dir(other).exists(), f"{email} holds {other}'s report folder"
        copies = [p for p in mine.datasites.rglob("cpu_tracker.json") if not p.is_relative_to(mine.my_datasite)]
        assert copies == [], f"{email} received {copies}"
    agg = paths(net, AGG)
    assert all(agg.report_file(m).is_file() for m in ALL_MEMBERS)


def _download(site: Datasite, net: LocalNetwork, path: str) -> tuple[int, bytes]:
    token = json.loads(site.config_path.read_text())["access_token"]
    req = urllib.request.Request(f"{net.server_url}/sync/download", data=json.dumps({"path": path}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_relay_refuses_a_report_to_anyone_but_the_aggregator(net: LocalNetwork) -> None:
    """Asked directly with their own credentials, the outsider and the other members get 403 for the probe's
    report; the aggregator gets exactly the probe's file (the check is not vacuous)."""
    report = f"{PROBE}/app_data/cpu_tracker/cpu_tracker.json"
    for email in [*MEMBERS, OUTSIDER]:
        status, body = _download(net.sites[email], net, report)
        assert status == 403, f"{email} got {status} for the probe's report"
        assert b"release" not in body
    for perm in ("syftperm.yaml", "syft.pub.yaml"):  # nor the permission files that name the aggregator
        assert _download(net.sites[OUTSIDER], net, f"{PROBE}/app_data/cpu_tracker/{perm}")[0] == 403
    status, body = _download(net.sites[AGG], net, report)
    assert status == 200 and json.loads(body)["kind"] == "cpu_tracker.member_report"


def test_the_public_dashboard_names_no_member_and_no_value(net: LocalNetwork) -> None:
    released = {}
    for m in ALL_MEMBERS:
        for line in paths(net, m).raw_file.read_text().splitlines():
            row = json.loads(line)
            released[row["released"]] = m
    assert len(released) >= 4 * 3
    copies = [paths(net, AGG).public_dir()] + [paths(net, e).public_dir(AGG) for e in [*ALL_MEMBERS, OUTSIDER]] + \
             [net.server_files() / AGG / "public" / "cpu_tracker"]
    for folder in copies:
        files = [p for p in folder.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"dashboard.json", "current.json", "index.json"} <= names, f"no figure in {folder}: {names}"
        for p in files:
            text = p.read_text("utf-8")
            for email in [*ALL_MEMBERS, OUTSIDER]:
                assert email not in text, f"{email} named in {p}"
            if p.suffix == ".json" and not p.name.endswith(".schema.json"):
                assert "@" not in text
                for value, owner in released.items():
                    assert repr(value) not in text, f"{owner}'s released value {value!r} in {p}"
