"""Secure rounds on a real local SyftBox network (relay server, 5 members in secure mode, 1 aggregator, the app
started by SyftBox's scheduler): from a round's window end to the first ``current.json`` that shows its figure, in
intervals, without dropouts and after one member is stopped (its client and app killed).

Each published round's lag is ``generated_at`` of the first ``current.json`` showing it minus its ``round_end``
(polled twice a second). Goals (issue 18, protocol version 2 with its consistency round: the view of round r is
signed when its inbox arrives, the reveal follows the next inbox): at most 3 intervals without dropouts, at most 4
with.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from tests.bench.common import Result, Row

AGG = "aggregator@bench.example.org"


def run(ctx) -> Result:
    from tests.localnet.demo import install_tracker, secure_settings, site_paths
    from tests.localnet.network import LocalNetwork

    interval = 8.0 if ctx.quick else 20.0
    observe = 6 * interval if ctx.quick else 12 * interval
    members = [f"member{i}@bench.example.org" for i in range(1, 6)]
    res = Result("secure_latency", f"Secure rounds on a local SyftBox network: window end to figure (interval "
                                   f"{interval:g} s, 5 members)")
    root = Path(tempfile.mkdtemp(prefix="secure-", dir=ctx.work))
    lags: dict[str, list[float]] = {"no dropout": [], "one member stopped": []}
    with LocalNetwork(root / "net", Path(sys.prefix) / "bin", [*members, AGG], log=ctx.log) as net:
        install_tracker(net, members, AGG, secure_settings(AGG, interval))
        agg = site_paths(net, AGG)
        seen: dict[int, float] = {}
        net.wait_for(lambda: _poll(agg, seen) or seen, timeout=300, what="the first secure round")
        phase_start = time.monotonic()
        for phase in lags:
            if phase == "one member stopped":
                net.stop_client(members[-1])
            first = max(seen) if seen else -1
            until = time.monotonic() + observe
            while time.monotonic() < until:
                _poll(agg, seen, lags[phase], after=first)
                time.sleep(0.5)
        ctx.log(f"secure_latency: observed {time.monotonic() - phase_start:.0f} s")
    for phase, values in lags.items():
        goal = 3 if phase == "no dropout" else 4
        worst = max(values) / interval if values else None
        res.rows.append(Row(f"window end to figure, {phase}: worst of {len(values)} rounds", worst, "intervals",
                            "", None, f"<= {goal} intervals", worst is not None and worst <= goal,
                            f"median {statistics.median(values) / interval:.2f} intervals" if values else
                            "no round published"))
    res.details = {k: v for k, v in lags.items()}
    return res


def _poll(agg, seen: dict[int, float], out: list[float] | None = None, after: int = -1) -> None:
    try:
        dash = json.loads(agg.current_file.read_text())
    except (OSError, json.JSONDecodeError):
        return
    sec = dash.get("secure")
    if not sec or sec["round"] in seen:
        return
    lag = (datetime.fromisoformat(dash["generated_at"]) - datetime.fromisoformat(sec["round_end"])).total_seconds()
    seen[sec["round"]] = lag
    if out is not None and sec["round"] > after:
        out.append(lag)
