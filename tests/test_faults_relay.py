"""Relay down, then back, on a real local SyftBox network: a relay server and 4 real clients on 127.0.0.1,
the app started in each by SyftBox's own scheduler through run.sh (3 members, 1 aggregator).

While the relay is down the members keep measuring, but spend at most one release each: the SyftBox client
records which version of each file the relay holds (``plugins/local_syncstate.json``), and a member whose last
report has not reached the relay spends nothing more until it has (the client would upload only the newest, so
every release written meanwhile but the last was charged for nothing: 11 in a 120 s outage, before). The
aggregator's figure goes away once the members turn stale, and the dashboard records the gap (null points). When
the relay is back on the same port with the same data, the figure recovers by itself; each member's ledger holds
one release per window outside the outage and at most one inside it, none twice, each one published, and no
budget exceeded.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cpu_tracker_aggregator.publish import read_history
from shared.ledger import load_spends
from tests.localnet.demo import install_tracker, site_paths
from tests.localnet.network import LocalNetwork
from shared.schema import Current, MemberReport
from shared.settings import Settings
from tests.test_faults import worst_spans

pytestmark = pytest.mark.network

MEMBERS = ["m1@example.org", "m2@example.org", "m3@example.org"]
AGG = "agg@example.org"
INTERVAL_S, STALE_AFTER_S = 2, 8
SETTINGS = f'aggregator = "{AGG}"\ninterval_s = {INTERVAL_S}\ntick_s = 1\nstale_after_s = {STALE_AFTER_S}\n'


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with LocalNetwork(tmp_path_factory.mktemp("relay"), Path(sys.prefix) / "bin", [*MEMBERS, AGG],
                      log=lambda _: None) as n:
        install_tracker(n, MEMBERS, AGG, SETTINGS)
        yield n


paths = site_paths


def dashboard(net: LocalNetwork) -> Current | None:
    try:
        return Current.model_validate_json(paths(net, AGG).current_file.read_bytes())
    except (OSError, ValueError):
        return None


def fresh(net: LocalNetwork, n: int) -> Current | None:
    d = dashboard(net)
    return d if d is not None and d.counts.fresh == n and d.status == "ok" else None


def report(path: Path) -> MemberReport | None:
    try:
        return MemberReport.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


def test_relay_down_then_back(net: LocalNetwork) -> None:
    net.wait_for(lambda: fresh(net, 3), timeout=180, what="3 fresh members before the outage")

    net.stop_server()
    down_at = datetime.now(timezone.utc)
    time.sleep(0.5)  # a download already under way when the relay stopped may still land
    seen_by_agg = {m: paths(net, AGG).report_file(m).read_bytes() for m in MEMBERS}
    gap = net.wait_for(lambda: (d := dashboard(net)) and d.counts.fresh == 0 and d, timeout=STALE_AFTER_S + 30,
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
        elapsed = (spends[-1].window_end - spends[0].window_start).total_seconds() - (up_at - down_at).total_seconds()
        assert abs(len(spends) - elapsed / INTERVAL_S) <= 4, f"{m}: {len(spends)} releases over {elapsed:.0f} s"
    # once synced again, the aggregator holds each member's current report
    net.wait_for(lambda: all(paths(net, AGG).report_file(m).read_bytes() == paths(net, m).report_file().read_bytes()
                             for m in MEMBERS), timeout=60, what="the aggregator to catch up with every member")
