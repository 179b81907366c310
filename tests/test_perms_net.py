"""Permissions that fail closed, on a real relay: a SyftBox 0.4.0 server and real clients on 127.0.0.1.

A "probe" member runs the real member loop in this process inside its real client's data folder, so it reads that
client's own record of what the relay holds (``plugins/local_syncstate.json``). Another app (this test) then writes
permission files the way the issue found them leaking, and asks the relay directly, with the outsider's and the
aggregator's own credentials, who may download the probe's report:

- ``notes.syftperm.yaml`` granting everyone, in the report folder: the member withdraws (the relay deletes its
  copy); once the file is removed, the relay still applies its rules, so the member writes its own syftperm.yaml
  again and publishes only after the client has uploaded that; the outsider never gets the report afterwards;
- a root grant to everyone, then "fixed" by emptying the file, which the client refuses to upload (the relay keeps
  the grant): the member stays withdrawn until the file is fixed for real.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from cpu_tracker_member.member import Member, run_member
from shared.logs import Problems
from shared.paths import Paths
from shared.settings import Settings
from tests.localnet.network import LocalNetwork

pytestmark = pytest.mark.network

PROBE, OUTSIDER, AGG = "probe@example.org", "outsider@example.org", "agg@example.org"
GRANT = yaml.safe_dump([{"path": "**", "user": "*", "permissions": ["read"]}])
INTERVAL_S = 2.0


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with LocalNetwork(tmp_path_factory.mktemp("perms"), Path(sys.prefix) / "bin", [PROBE, OUTSIDER, AGG],
                      log=lambda _: None) as n:
        paths = Paths(n.sites[PROBE].data_dir, PROBE)
        member = Member(paths, Settings(aggregator=AGG, interval_s=INTERVAL_S), Problems(logging.getLogger("probe")))
        stop = threading.Event()
        thread = threading.Thread(target=run_member, args=(member, stop), kwargs={"read": lambda: 42.0}, daemon=True)
        thread.start()
        n.member, n.paths = member, paths
        try:
            yield n
        finally:
            stop.set()
            thread.join(10)


def download(net: LocalNetwork, who: str, path: str) -> int:
    """The HTTP status the relay answers ``who`` asking for ``path`` (its own credentials)."""
    token = json.loads(net.sites[who].config_path.read_text())["access_token"]
    req = urllib.request.Request(f"{net.server_url}/sync/download", data=json.dumps({"path": path}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


REPORT = f"{PROBE}/app_data/cpu_tracker/cpu_tracker.json"


def on_relay(net: LocalNetwork) -> bool:
    return (net.server_files() / REPORT).is_file()


def published(net: LocalNetwork) -> bool:
    """The report is on the relay, the aggregator may download it and the outsider may not."""
    return on_relay(net) and download(net, AGG, REPORT) == 200 and download(net, OUTSIDER, REPORT) == 403


def never_to_the_outsider(net: LocalNetwork, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert download(net, OUTSIDER, REPORT) != 200, "the outsider downloaded the report"
        time.sleep(0.5)


def test_the_member_reads_the_real_clients_record(net: LocalNetwork) -> None:
    net.wait_for(lambda: published(net), 90, what="the probe's report on the relay, for the aggregator only")
    record = json.loads(net.paths.sync_state_file.read_text())
    key = f"{PROBE}/app_data/cpu_tracker/syftperm.yaml"
    assert key in record["states"] and record["status_info"][key]["status"] == "synced"


def test_a_notes_syftperm_in_the_report_folder(net: LocalNetwork) -> None:
    net.wait_for(lambda: published(net), 90, what="the probe's report published")
    notes = net.paths.report_dir() / "notes.syftperm.yaml"
    notes.write_text(GRANT)
    net.wait_for(lambda: not on_relay(net), 60, what="the report withdrawn from the relay")
    never_to_the_outsider(net, 3 * INTERVAL_S)
    notes.unlink()
    net.wait_for(lambda: not (net.server_files() / PROBE / "app_data/cpu_tracker/notes.syftperm.yaml").exists(), 60,
                 what="the deletion of notes.syftperm.yaml on the relay")
    net.wait_for(lambda: on_relay(net), 90, what="the report published again")
    assert download(net, OUTSIDER, REPORT) == 403 and download(net, AGG, REPORT) == 200
    assert b"# cpu_tracker: written again" in (net.paths.report_dir() / "syftperm.yaml").read_bytes()
    never_to_the_outsider(net, 2 * INTERVAL_S)


def test_an_emptied_root_grant_keeps_the_member_withdrawn(net: LocalNetwork) -> None:
    net.wait_for(lambda: published(net), 90, what="the probe's report published")
    root = net.paths.my_datasite / "syftperm.yaml"
    original = root.read_bytes()
    root.write_text(GRANT)
    net.wait_for(lambda: not on_relay(net), 60, what="the report withdrawn from the relay")
    root.write_text("# fixed?\n")  # the client refuses to upload it: the relay keeps the grant
    key = f"{PROBE}/syftperm.yaml"
    net.wait_for(lambda: json.loads(net.paths.sync_state_file.read_text())["status_info"][key]["status"] == "error",
                 60, what="the client refusing the emptied file")
    time.sleep(3 * INTERVAL_S)
    assert not on_relay(net), "the member published while the relay still granted everyone"
    assert "will not while it is invalid" in net.member.exposed or "empty or only comments" in net.member.exposed
    root.write_bytes(original)
    net.wait_for(lambda: published(net), 90, what="the report published again once the root file is fixed")
