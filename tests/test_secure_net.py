"""Secure aggregation on a real network: a SyftBox relay server and 6 clients on 127.0.0.1 (5 members in secure
mode, 1 member still in local mode, 1 aggregator: a network migrating), the app started by SyftBox's scheduler through
run.sh, real keys, masks, shares and noise, real files synced through the relay. One member is killed mid-run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from shared.schema import SCHEMA_DIR
from shared.secagg import decode_vector
from shared.secure_schema import Epoch, SecureUpload
from tests.localnet.demo import REPO, install_tracker, secure_settings, site_paths
from tests.localnet.network import LocalNetwork

pytestmark = pytest.mark.network

MEMBERS = [f"s{i}@example.org" for i in range(1, 6)]
LOCAL = "l1@example.org"
AGG = "agg@example.org"
INTERVAL = 8.0


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    with LocalNetwork(root, Path(sys.prefix) / "bin", [*MEMBERS, LOCAL, AGG], log=lambda _: None) as n:
        install_tracker(n, MEMBERS, AGG, secure_settings(AGG, INTERVAL) + "stale_after_s = 60\nmin_members = 1\n")
        n.install_app(REPO, symlink=False, emails=[LOCAL],
                      files={"cpu_tracker.toml": f'aggregator = "{AGG}"\ninterval_s = {INTERVAL}\n'})
        yield n


def current(net) -> dict | None:
    try:
        return json.loads(site_paths(net, AGG).current_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def secure_with(net, survivors: int, after_round: int = -1, timeout: float = 240) -> dict:
    return net.wait_for(lambda: (d := current(net)) and d.get("secure") and d["secure"]["survivors"] == survivors
                        and d["secure"]["round"] > after_round and d, timeout=timeout,
                        what=f"a secure round with {survivors} survivors after round {after_round}")


def test_secure_rounds_complete_and_the_dashboard_figure_comes_from_the_sum(net):
    dash = secure_with(net, 5)
    sec = dash["secure"]
    assert sec["cohort"] == 5 and sec["unit"] == "cpu_second"
    assert sec["ci95_low"] < sec["mean"] < sec["ci95_high"] and sec["ci95_high"] - sec["ci95_low"] < 10
    assert {"p50", "p90", "p99"} <= set(sec["percentiles"]) and sec["share_above"] is not None
    assert sec["epsilon"] <= 5.0 + 1e-6
    # both figures during a migration: the local member's report as `estimate`, the secure cohort's sum as `secure`
    dash = net.wait_for(lambda: (d := current(net)) and d["counts"]["fresh"] == 1 and d.get("secure") and d,
                        timeout=120, what="the local member's report beside the secure figure")
    assert dash["estimate"]["members"] == 1 and dash["mode"] == "local" and dash["secure"]["mode"] == "secure"
    jsonschema.validate(dash, json.loads((SCHEMA_DIR / "current.schema.json").read_text()))
    # window end to figure: the published round ended at most 2 intervals (plus a tick) before the figure
    from datetime import datetime

    lag = (datetime.fromisoformat(dash["generated_at"]) - datetime.fromisoformat(sec["round_end"])).total_seconds()
    assert lag <= 2 * INTERVAL + 4, lag


def test_no_member_receives_another_members_upload_and_the_relay_holds_only_masked_words(net):
    secure_with(net, 5)
    for m in [*MEMBERS, LOCAL]:
        mine = site_paths(net, m)
        for other in MEMBERS:
            if other != m:
                assert not mine.upload_dir(other).exists(), f"{m} received {other}'s round files"
                assert not mine.inbox_dir(other, AGG).exists(), f"{m} received {other}'s inbox"
    snapshot = net.server_files()
    uploads = list(snapshot.glob("*/app_data/cpu_tracker/secure/r*.json"))
    assert uploads
    epoch = Epoch.model_validate_json(site_paths(net, AGG).epoch_file().read_bytes())
    small = 1 << 24  # an unmasked word (a quantized mean, a count, noise) is small; a masked one is uniform mod 2^64
    for f in uploads:
        up = SecureUpload.model_validate_json(f.read_bytes())
        if not up.vector:
            continue
        words = decode_vector(up.vector, epoch.dim).astype(object)
        assert all(small < w < (1 << 64) - small for w in words), f"{f} holds a small (unmasked) word"
    assert not list(snapshot.glob("*/private/**/*.key"))
    public = "".join(p.read_text() for p in site_paths(net, AGG).public_dir().rglob("*.json"))
    assert not any(m in public for m in [*MEMBERS, LOCAL])  # nothing world-readable says who takes part
    outsider = site_paths(net, LOCAL)  # a local-mode member is not in the cohort: it cannot read the epoch
    assert not outsider.epoch_file(AGG).exists()


def test_a_member_killed_mid_run_is_handled(net):
    dash = secure_with(net, 5)
    net.stop_client(MEMBERS[-1])
    after = dash["secure"]["round"]
    later = secure_with(net, 4, after_round=after, timeout=240)
    sec = later["secure"]
    assert sec["cohort"] in (4, 5)  # a new epoch without it follows after a few absent rounds
    recent = {r["round"]: r for r in sec["recent"]}
    assert all(r["status"] in ("published", "refused", "failed") for r in recent.values())
