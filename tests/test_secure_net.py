"""Secure aggregation on a real network: a SyftBox relay server and 7 clients on 127.0.0.1 (5 members in secure
mode, 1 member still in local mode, 1 aggregator: a network migrating), the app started by SyftBox's scheduler through
run.sh, real identity keys (did.json), signed and MAC'd files, masks, shares and noise, real files synced through the
relay. The aggregator is SIGKILLed mid-run and started again by SyftBox; one member is killed."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest

from shared.privacy.ledger import load_spends
from shared.secure import identity, secagg
from shared.wire.catalog import SCHEMA_DIR
from shared.secure.secagg import decode_vector
from shared.wire.secure_schema import Epoch, SecureAnswers, SecureUpload, b64_bytes, read_mac
from tests.adversary import reveal_entries
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


def lag_intervals(dash: dict) -> float:
    """From the published round's end to the first figure that shows it, in intervals."""
    sec = dash["secure"]
    return (datetime.fromisoformat(dash["generated_at"]) - datetime.fromisoformat(sec["round_end"])).total_seconds() \
        / INTERVAL


def first_showing(net, after_round: int, survivors: int, timeout: float = 240) -> dict:
    """The first current.json that shows a round after ``after_round`` (polled twice a second)."""
    return net.wait_for(lambda: (d := current(net)) and d.get("secure") and d["secure"]["round"] > after_round
                        and d["secure"]["survivors"] == survivors and d, timeout=timeout, interval=0.25,
                        what=f"the first secure round after {after_round}")


def test_secure_rounds_complete_within_three_intervals_and_the_figure_comes_from_the_sum(net):
    dash = secure_with(net, 5)
    sec = dash["secure"]
    assert sec["cohort"] == 5 and sec["unit"] == "cpu_second"
    assert sec["ci95_low"] < sec["mean"] < sec["ci95_high"] and sec["ci95_high"] - sec["ci95_low"] < 10
    assert {"p50", "p90", "p99"} <= set(sec["percentiles"]) and sec["share_above"] is not None
    assert sec["epsilon"] <= 5.0 + 1e-6
    one = first_showing(net, sec["round"], 5)
    two = first_showing(net, one["secure"]["round"], 5)
    lags = [lag_intervals(one), lag_intervals(two)]
    assert max(lags) <= 3.0, lags  # window end to figure, without dropouts (issue 18: within 3 intervals)
    # both figures during a migration: the local member's report as `estimate`, the secure cohort's sum as `secure`
    dash = net.wait_for(lambda: (d := current(net)) and d["counts"]["fresh"] == 1 and d.get("secure") and d,
                        timeout=120, what="the local member's report beside the secure figure")
    assert dash["estimate"]["members"] == 1 and dash["mode"] == "local" and dash["secure"]["mode"] == "secure"
    jsonschema.validate(dash, json.loads((SCHEMA_DIR / "current.schema.json").read_text()))


def test_the_relay_holds_only_masked_words_and_sealed_reveals(net):
    """What the relay operator stores: masked words (uniform mod 2^64), shares and reveals sealed (a revealed share,
    opened with the aggregator's own key, appears nowhere in the relay's files); no member receives another's files;
    nothing world-readable names a member of the cohort."""
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
        words = decode_vector(up.vector, epoch.dim).astype(object)
        assert all(small < w < (1 << 64) - small for w in words), f"{f} holds a small (unmasked) word"
    # open one member's reveals with the aggregator's own keys: the plain shares are nowhere on the relay
    agg_key = next((net.sites[AGG].data_dir.parent / ".syftbox").glob("*/pvt.jwks.json"))
    me = identity.Identity.from_private_jwks(AGG, json.loads(agg_key.read_text()))
    member = MEMBERS[0]
    theirs = identity.parse_did(site_paths(net, AGG).did_file(member).read_bytes(), member)
    secret = secagg.aggregator_secret(me.prekey_private, theirs.prekey, member=member, member_public=theirs.prekey,
                                      aggregator=AGG, aggregator_public=me.public.prekey)
    answers = read_mac((snapshot / member / "app_data/cpu_tracker/secure/answers.json").read_bytes(), SecureAnswers,
                       secagg.mac_key(secret, "answers"))
    assert answers.reveals
    relay_bytes = b"".join(f.read_bytes() for f in snapshot.rglob("*") if f.is_file())
    for sr in answers.reveals:
        plain = secagg.unseal(secagg.reveal_key(secret), b64_bytes(sr.sealed),
                              secagg.reveal_aad(b64_bytes(sr.epoch_hash), sr.round))
        entries = [e for e in reveal_entries(plain, epoch.degree) if e is not None]  # None: nothing for that one
        assert entries
        for e in entries:
            raw = e if isinstance(e, bytes) else secagg.seed_bytes(e)
            assert raw not in relay_bytes and base64.b64encode(raw) not in relay_bytes
    assert not list(snapshot.glob("**/pvt.jwks.json")) and not list(snapshot.glob("*/private/**"))
    public = "".join(p.read_text() for p in site_paths(net, AGG).public_dir().rglob("*.json"))
    assert not any(m in public for m in [*MEMBERS, LOCAL])  # nothing world-readable says who takes part
    outsider = site_paths(net, LOCAL)  # a local-mode member is not in the cohort: it cannot read the epoch
    assert not outsider.epoch_file(AGG).exists() and not outsider.rounds_file(AGG).exists()


def charged_rounds(net) -> dict[int, int]:
    """Round -> how many secure members charged it, from each member's own ledger."""
    out: dict[int, int] = {}
    for m in MEMBERS:
        for s in load_spends(site_paths(net, m).ledger_file):
            if s.mechanism.startswith("secure-"):
                r = round(s.window_start.timestamp() / INTERVAL)
                out[r] = out.get(r, 0) + 1
    return out


def outcomes(net) -> tuple[int | None, dict[int, str]]:
    """The aggregator's epoch and every round's outcome, from its own record (private, kept across restarts)."""
    try:
        doc = json.loads(site_paths(net, AGG).aggregator_secure_file.read_text())
    except (OSError, ValueError):
        return None, {}
    return doc["epoch"], {o["round"]: o["status"] for o in doc["outcomes"]}


def test_an_aggregator_killed_mid_round_closes_every_round_members_charged(net):
    """Issue 19's soak: an aggregator SIGKILLed (its supervisor and worker: a crash, as SyftBox sees it) is started
    again by SyftBox's scheduler, resumes its epoch and gives every round a member charged, before or while it was
    down, an outcome (published, refused or failed), without withdrawing its epoch; a figure follows."""
    dash = secure_with(net, 5)
    epoch, _ = outcomes(net)
    procs = net.app_processes(AGG)
    old = {p for p, (_, cmd) in procs.items() if ".runner " in cmd}  # shared.host.runner: supervisor, worker
    assert any("--worker" in procs[p][1] for p in old) and len(old) >= 2, procs  # the supervisor and its worker
    for pid in procs:
        os.kill(pid, signal.SIGKILL)
    net.wait_for(lambda: any("--worker" in cmd and p not in old for p, (_, cmd) in net.app_processes(AGG).items()),
                 timeout=60, what="SyftBox to start the aggregator's run.sh again, and its worker")
    charged = charged_rounds(net)  # every round charged so far, those uploaded while it was down included
    assert charged and max(charged) >= dash["secure"]["round"]

    def all_closed():
        _, seen = outcomes(net)
        return all(seen.get(r) in ("published", "refused", "failed") for r in charged) and seen
    seen = net.wait_for(all_closed, timeout=90, what=f"an outcome for each of the charged rounds {sorted(charged)}")
    assert outcomes(net)[0] == epoch  # resumed, not a new epoch
    log = (net.sites[AGG].apps / "cpu_tracker" / "logs" / "cpu_tracker.log").read_text()  # this run's: truncated at start
    assert "resumed epoch" in log and "withdrawn" not in log  # its epoch folder's own grant is no exposure
    secure_with(net, 5, after_round=max(charged), timeout=90)  # and the rounds go on
    print({r: seen[r] for r in sorted(charged)})


def test_a_member_killed_mid_run_is_handled_within_four_intervals(net):
    dash = secure_with(net, 5)
    net.stop_client(MEMBERS[-1])
    after = dash["secure"]["round"]
    later = secure_with(net, 4, after_round=after, timeout=240)
    sec = later["secure"]
    assert sec["cohort"] in (4, 5)  # a new epoch without it follows after a few absent rounds
    recent = {r["round"]: r for r in sec["recent"]}
    assert all(r["status"] in ("published", "refused", "failed") for r in recent.values())
    lag = lag_intervals(first_showing(net, sec["round"], 4))
    assert lag <= 4.0, lag  # with a dropout (issue 18: within 4 intervals)
