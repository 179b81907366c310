"""The whole promise on one real network: a SyftBox relay server and 6 real clients on 127.0.0.1, the app installed
into each client's apps/ folder and started by SyftBox's own scheduler through run.sh, real diffprivlib noise, real
files synced through the relay.

- 3 members and the aggregator run the app through SyftBox's scheduler (run.sh), with real psutil readings;
- a "probe" member runs the real member loop in this process with readings chosen to be unmistakable
  (12 significant digits), so that finding one of its raw means anywhere is proof of a leak, never chance
  (psutil's 1-decimal readings such as 100.0 also appear in every report's bounds); its private folder also
  holds a canary file; it stops once it has published, and is stale for the aggregator ``STALE_AFTER_S`` later;
- an "outsider" datasite runs nothing: a third party that asks the relay for everything it can.

One network for three sets of tests, in this order (the last one stops the relay):

1. Secrecy (was ``test_secrecy.py``): the relay's stored files and database never contain a raw mean, a ledger or
   raw-file line, the canary, or any path under a private folder; no member (nor the outsider) ever receives another
   member's report, and the relay refuses to serve it to them when asked directly, while serving it to the
   aggregator; the public dashboard, wherever it is copied, names no member and carries no member's released value.
2. The figure (was ``test_e2e.py``): once the probe is stale, the aggregator counts the three members fresh with an
   interval; their reports reach only it; the relay holds no raw figure and nothing private.
3. Relay down, then back (was ``test_faults_relay.py``): while the relay is down the members keep measuring, but
   spend at most one release each: the SyftBox client records which version of each file the relay holds
   (``plugins/local_syncstate.json``), and a member whose last report has not reached the relay spends nothing more
   until it has (the client would upload only the newest, so every release written meanwhile but the last was
   charged for nothing: 11 in a 120 s outage, before). The aggregator's figure goes away once the members turn stale,
   and the dashboard records the gap (null points). When the relay is back on the same port with the same data, the
   figure recovers by itself; each member's ledger holds one release per window outside the outage and at most one
   inside it, none twice, each one published, and no budget exceeded.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest

from cpu_tracker_aggregator.publish import read_history
from cpu_tracker_member.member import Member, run_member
from shared.privacy.ledger import load_spends
from shared.logs import Problems
from shared.wire.catalog import SCHEMA_DIR
from shared.wire.schema import Current, MemberReport
from shared.settings import Settings
from tests.localnet.demo import install_tracker, site_paths
from tests.localnet.network import Datasite, LocalNetwork
from tests.test_faults import worst_spans

pytestmark = pytest.mark.network

MEMBERS = ["m1@example.org", "m2@example.org", "m3@example.org"]
PROBE, OUTSIDER, AGG = "probe@example.org", "outsider@example.org", "agg@example.org"
ALL_MEMBERS = [*MEMBERS, PROBE]
INTERVAL_S, STALE_AFTER_S = 2, 10
SETTINGS = f'aggregator = "{AGG}"\ninterval_s = {INTERVAL_S}\ntick_s = 1\nstale_after_s = {STALE_AFTER_S}\n'
PROBE_WINDOWS = 6
CANARY = f"canary-{secrets.token_hex(16)}"


def probe_value(i: int) -> float:
    """The probe's i-th raw window mean: 12 significant digits, never a round number."""
    return 37.1234567891 + i * 1.0000001 % 50


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with LocalNetwork(tmp_path_factory.mktemp("network"), Path(sys.prefix) / "bin", [*ALL_MEMBERS, OUTSIDER, AGG],
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
            n.wait_for(lambda: (d := read_json(paths(n, AGG).current_file)) and d["counts"]["fresh"] == 4,
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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def current(net: LocalNetwork) -> dict | None:
    return read_json(paths(net, AGG).current_file)


def schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / name).read_text())


def current_model(net: LocalNetwork) -> Current | None:
    try:
        return Current.model_validate_json(paths(net, AGG).current_file.read_bytes())
    except (OSError, ValueError):
        return None


def fresh(net: LocalNetwork, n: int) -> Current | None:
    d = current_model(net)
    return d if d is not None and d.counts.fresh == n and d.status == "ok" else None


def report(path: Path) -> MemberReport | None:
    try:
        return MemberReport.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


# -- 1. secrecy ---------------------------------------------------------------------------------------------
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


# -- 2. the figure -----------------------------------------------------------------------------------------------
def test_dashboard_counts_three_fresh_members_with_an_interval(net):
    dash = net.wait_for(
        lambda: (d := current(net)) and d["counts"]["fresh"] == 3 and d, timeout=240, what="3 fresh members"
    )
    est = dash["estimate"]
    assert dash["status"] == "ok" and est["members"] == 3
    assert est["ci95_low"] < est["mean"] < est["ci95_high"]
    assert dash["counts"]["rejected"] == 0
    jsonschema.validate(dash, schema("current.schema.json"))
    jsonschema.validate(json.loads(paths(net, AGG).dashboard_file.read_text()), schema("dashboard.schema.json"))


def test_reports_reach_only_the_aggregator(net):
    agg = paths(net, AGG)
    net.wait_for(lambda: all(agg.report_file(m).exists() for m in MEMBERS), timeout=120, what="reports at agg")
    for m in MEMBERS:
        jsonschema.validate(json.loads(agg.report_file(m).read_text()), schema("member_report.schema.json"))
    # barrier: each member holds the aggregator's current.json, written after the reports it counted,
    # so each member has synced since the other members' reports reached the relay
    for m in MEMBERS:
        mine = paths(net, m)
        net.wait_for(lambda: (mine.public_dir(AGG) / "current.json").exists(),
                     timeout=120, what=f"dashboard at {m}")
        for other in MEMBERS:
            if other != m:
                assert not mine.report_file(other).exists(), f"{m} received {other}'s report"
                assert not mine.report_dir(other).exists()


def test_relay_holds_no_raw_figure_and_nothing_private(net):
    raws = []
    for m in MEMBERS:
        raw_file = paths(net, m).raw_file
        net.wait_for(raw_file.exists, timeout=120, what=f"raw file of {m}")
        raws += [json.loads(line)["raw_mean"] for line in raw_file.read_text().splitlines()]
    stored = [p for p in net.server_files().rglob("*") if p.is_file()] + net.server_db_files()
    blob = b"".join(p.read_bytes() for p in stored if p.exists())
    assert raws and stored
    for raw in raws:  # a round reading such as 100.0 also stands in every report's bounds: check the others
        if len(repr(raw)) >= 8:
            assert repr(raw).encode() not in blob, f"raw mean {raw!r} found on the relay"
    for secret in (b"raw_mean", b"ledger.jsonl", b"raw.jsonl", b"window_start\":", b"private/cpu_tracker"):
        assert secret not in blob
    dash_text = "".join(p.read_text() for p in paths(net, AGG).public_dir().rglob("*.json"))
    for m in MEMBERS:
        assert m not in dash_text  # no member email in anything public


# -- 3. relay down, then back (stops the relay: last) ------------------------------------------------------------
def test_relay_down_then_back(net: LocalNetwork) -> None:
    net.wait_for(lambda: fresh(net, 3), timeout=180, what="3 fresh members before the outage")

    net.stop_server()
    down_at = datetime.now(timezone.utc)
    time.sleep(0.5)  # a download already under way when the relay stopped may still land
    seen_by_agg = {m: paths(net, AGG).report_file(m).read_bytes() for m in MEMBERS}
    gap = net.wait_for(lambda: (d := current_model(net)) and d.counts.fresh == 0 and d, timeout=STALE_AFTER_S + 30,
                       what="the figure to go away while the relay is down")
    assert gap.status == "too_few_members" and gap.estimate is None
    time.sleep(4 * INTERVAL_S)  # many windows of outage in all
    for m in MEMBERS:  # nothing reaches the aggregator meanwhile ...
        assert paths(net, AGG).report_file(m).read_bytes() == seen_by_agg[m]
    up_at = datetime.now(timezone.utc)
    outage_windows = (up_at - down_at).total_seconds() / INTERVAL_S
    for m in MEMBERS:  # ... and each member spent at most one release on it (plus one written just before)
        during = [s for s in load_spends(paths(net, m).ledger_file) if s.released_at > down_at]
        print(f"{m}: {len(during)} release(s) charged in {outage_windows:.0f} windows of outage")
        assert len(during) <= 2 < outage_windows, f"{m}: {len(during)} releases in {outage_windows:.0f} windows"

    net.start_server()
    net.wait_for(lambda: fresh(net, 3), timeout=120, what="the figure to recover once the relay is back")
    _, history = read_history(paths(net, AGG).public_dir())  # as any reader of the public folder sees it
    mean = history.recent.mean
    first_null = mean.index(None, next(i for i, v in enumerate(mean) if v is not None))
    assert any(v is not None for v in mean[:first_null]), "no figure before the gap"
    assert mean[-1] is not None and None in mean[first_null:], "the gap is not in the history"
    assert 0 in history.recent.members, "the gap's points do not say that no member was fresh"

    settings = Settings(aggregator=AGG)
    for m in MEMBERS:
        p = paths(net, m)
        spends = load_spends(p.ledger_file)
        assert len(spends) == len(set(spends)), f"{m}: a release recorded twice"
        for a, b in zip(spends, spends[1:]):  # one long-lived process: back to back, but for the outage's gap
            assert b.window_start == a.window_end or (b.window_start > a.window_end and down_at <= b.released_at
                                                      and a.window_end <= up_at + timedelta(seconds=INTERVAL_S)), \
                f"{m}: a gap or an overlap in the ledger at {a.window_end}"
        raws = [json.loads(line) for line in p.raw_file.read_text().splitlines()]
        assert [r["window_end"] for r in raws] == [s.window_end.isoformat() for s in spends], \
            f"{m}: the published windows are not exactly the ledger's"
        latest = report(p.report_file())
        assert (latest.window.start, latest.window.end) == (spends[-1].window_start, spends[-1].window_end)
        for b in settings.budgets:
            assert worst_spans(spends, b.horizon_s) <= b.epsilon * (1 + 1e-9)
        lengths = [(sp.window_end - sp.window_start).total_seconds() for sp in spends]  # one window each, not merged
        assert all(0.5 * INTERVAL_S <= x <= 3 * INTERVAL_S for x in lengths[1:]), f"{m}: window lengths {lengths}"
    # once synced again, the aggregator holds each member's current report
    net.wait_for(lambda: all(paths(net, AGG).report_file(m).read_bytes() == paths(net, m).report_file().read_bytes()
                             for m in MEMBERS), timeout=60, what="the aggregator to catch up with every member")
