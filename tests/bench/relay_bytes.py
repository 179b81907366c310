"""Relay cost of the aggregator's public folder: bytes sent to every client, and bytes the relay scans, per tick.

Every syftbox 0.4.0 client mirrors every file it may read, so the public folder reaches every datasite on the
relay. For a changed file the relay computes an rsync diff against the client's copy (``py_fast_rsync``, its
own library and call: ``diff(signature.calculate(old), new)``), scanning the whole new file; a new file is sent
whole. This benchmark publishes an hour of ticks (a new figure every 10 s) on top of a history of 1 hour, 1 day
and 30 days, with the real ``Publisher``, and adds up, per tick, for every public file that changed: the diff
bytes (per client) and the bytes scanned (per client). Baseline: the schema-1 ``dashboard.json`` with the
whole history rewritten every tick, as before.
"""

from __future__ import annotations

import math
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.bench.common import Result, Row

TICK_S = 10
LENGTHS = (("1 hour", 3600), ("1 day", 86400), ("30 days", 30 * 86400))
GOAL_DIFF, GOAL_SCAN = 2048, 16384


def prefilled(end: int, length_s: int):
    """A history of ``length_s`` seconds before ``end``: ticks for up to 24 h, 5-minute points for the rest."""
    from cpu_tracker_aggregator.dashboard import COARSE_STEP_S, RECENT_S
    from shared.wire.schema import History, Series

    def series(times: list[int], resolution: float) -> Series:
        mean = [round(30 + 12 * math.sin(t / 3000), 3) for t in times]
        return Series(resolution_s=resolution, t=times, mean=mean, ci95_low=[round(m - 1.66, 3) for m in mean],
                      ci95_high=[round(m + 1.66, 3) for m in mean], members=[100] * len(times))

    recent = list(range(end - min(length_s, RECENT_S), end, TICK_S))
    first = end - length_s
    coarse = list(range(first - first % COARSE_STEP_S, end - end % COARSE_STEP_S, COARSE_STEP_S))
    return History(recent=series(recent, TICK_S), coarse=series(coarse, COARSE_STEP_S))


def measure(length_s: int, work: Path) -> dict:
    import py_fast_rsync
    from py_fast_rsync import signature

    from cpu_tracker_aggregator.dashboard import METHOD, add_point
    from cpu_tracker_aggregator.publish import Publisher
    from shared.wire.schema import AggregatorSettings, Counts, Dashboard, Estimate, PrivacySummary
    from shared.settings import Settings

    settings = Settings(aggregator="agg@bench.example.org")
    start = datetime(2026, 3, 1, 12, 0, 5, tzinfo=timezone.utc)
    history = prefilled(int(start.timestamp()), length_s)
    folder = work / f"public-{length_s}"
    publisher = Publisher(folder)
    seen: dict[str, bytes] = {}
    ours, base = [], []
    old_base = None

    def cost(old: bytes | None, new: bytes) -> tuple[int, int]:
        if old is None:
            return len(new), len(new)  # a new file is sent whole
        return len(py_fast_rsync.diff(signature.calculate(old), new)), len(new)

    for i in range(360 + 1):
        now = start + timedelta(seconds=TICK_S * i)
        est = Estimate(mean=30 + (i % 7) * 0.37, standard_error=0.12, ci95_low=29.7 + (i % 7) * 0.37,
                       ci95_high=30.3 + (i % 7) * 0.37, members=100, method=METHOD)
        message = (f"Network CPU {est.mean:.1f} % (95 % interval {est.ci95_low:.1f} to {est.ci95_high:.1f}) "
                   f"from {est.members} members.")  # as build_dashboard words it
        dash = Dashboard(app_version="0.1.0", generated_at=now, status="ok", message=message,
                         estimate=est, counts=Counts(fresh=100, stale=2, rejected=1, legacy=0),
                         privacy=PrivacySummary(mechanisms={"laplace": 100}, epsilon_min=0.5, epsilon_max=0.5,
                                                noise_scale_min=1.0, noise_scale_max=1.0, privacy_unit_s=0.1,
                                                window_s_max=20.0),
                         settings=AggregatorSettings(tick_s=TICK_S, stale_after_s=60, min_members=3),
                         history=add_point(history, now, est, 100, settings))
        history = dash.history
        publisher.publish(dash, int(now.timestamp()))
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        legacy = dash.model_dump_json().encode() + b"\n"
        if i == 0:  # the state every client already has
            seen, old_base = files, legacy
            continue
        diff = scan = 0
        for name, data in files.items():
            if seen.get(name) != data:
                d, s = cost(seen.get(name), data)
                diff, scan = diff + d, scan + s
        ours.append((diff, scan))
        base.append(cost(old_base, legacy))
        seen, old_base = files, legacy
    n = len(ours)
    return {
        "diff_mean": sum(d for d, _ in ours) / n, "scan_mean": sum(s for _, s in ours) / n,
        "diff_max": max(d for d, _ in ours), "scan_max": max(s for _, s in ours),
        "base_diff_mean": sum(d for d, _ in base) / n, "base_scan_mean": sum(s for _, s in base) / n,
        "files": len(seen), "public_bytes": sum(len(v) for v in seen.values()), "ticks": n,
    }


def run(ctx) -> Result:
    res = Result("relay_bytes", "Relay bytes per client per tick (public folder)")
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        for label, length_s in LENGTHS:
            ctx.log(f"relay_bytes: {label} of history")
            m = measure(length_s, Path(tmp))
            res.details[label] = m
            res.rows += [
                Row(f"diff sent per client per tick, {label} of history", round(m["diff_mean"]), "bytes",
                    "dashboard.json rewritten every tick", round(m["base_diff_mean"]), f"<= {GOAL_DIFF} bytes",
                    m["diff_mean"] <= GOAL_DIFF, note=f"worst tick {m['diff_max']:,} bytes"),
                Row(f"bytes the relay scans per client per tick, {label} of history", round(m["scan_mean"]), "bytes",
                    "dashboard.json rewritten every tick", round(m["base_scan_mean"]), f"<= {GOAL_SCAN} bytes",
                    m["scan_mean"] <= GOAL_SCAN, note=f"worst tick {m['scan_max']:,} bytes; "
                    f"{m['files']} public files, {m['public_bytes']:,} bytes in all"),
            ]
    res.notes.append(
        "Means over an hour of ticks (360, a new figure every 10 s: the worst case, every tick changes something), "
        "so the 5-minute block closes, the hourly index change and the half-hourly legacy dashboard.json are "
        "counted at their real rate. Diff bytes are py_fast_rsync's diff against the previous version (what the "
        "relay sends a client whose copy is current); a new file counts whole.")
    return res
