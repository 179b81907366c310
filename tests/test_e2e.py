"""The whole promise on a real network: a SyftBox relay server and 4 real clients on 127.0.0.1 (3 members,
1 aggregator), the app installed into each client's apps/ folder and started by SyftBox's own scheduler
through run.sh, real diffprivlib noise, real files synced through the relay."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.localnet.demo import install_tracker, site_paths
from tests.localnet.network import LocalNetwork
from shared.schema import SCHEMA_DIR

pytestmark = pytest.mark.network

MEMBERS = ["m1@example.org", "m2@example.org", "m3@example.org"]
AGG = "agg@example.org"
SETTINGS = f'aggregator = "{AGG}"\ninterval_s = 4\ntick_s = 2\nstale_after_s = 30\n'


def schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / name).read_text())


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with LocalNetwork(tmp_path_factory.mktemp("e2e"), Path(sys.prefix) / "bin", [*MEMBERS, AGG], log=lambda _: None) as n:
        install_tracker(n, MEMBERS, AGG, SETTINGS)
        yield n


paths = site_paths


def dashboard(net: LocalNetwork) -> dict | None:
    try:
        return json.loads(paths(net, AGG).current_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_dashboard_counts_three_fresh_members_with_an_interval(net):
    dash = net.wait_for(
        lambda: (d := dashboard(net)) and d["counts"]["fresh"] == 3 and d, timeout=240, what="3 fresh members"
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
