"""Secure soak: a real local SyftBox network in secure mode for 30 minutes, its aggregator SIGKILLed at a third of
it (SyftBox's scheduler starts run.sh again) and its relay server stopped for 120 s at two thirds. Opt-in:
``./run.sh bench --only secure_soak`` (``--quick``: 5 minutes, a 40 s outage); never part of the default run.

The network: one relay server, 5 members in secure mode, 1 member in local mode (to count local releases lost to
the outage) and the aggregator, each a real ``syftbox client`` running the app from its own copy through run.sh.
Every second the driver reads the aggregator's private round record (``secure.json``: its epoch and every round's
outcome), its ``current.json``, and the relay's stored copy of the local member's report; at the end, every
member's own ledger. From those:

- every round any member charged has exactly one final outcome at the aggregator (published, refused or failed);
- the rounds each member charged and did not see published around each event (the kill, the outage), and the local
  member's charged releases that never reached the relay;
- the epoch before and after the kill (a restart must resume it);
- every member's ledger within every rolling budget;
- the gap in figures: the time from each event to the first new secure figure on ``current.json``.

    python -m tests.bench.secure_soak --root DIR [--quick] [--duration S] [--interval S] [--outage S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from tests.bench.common import Result, Row

AGG = "agg@soak.example.org"
SECURE = [f"s{i}@soak.example.org" for i in range(1, 6)]
LOCAL = "l1@soak.example.org"
FINAL = ("published", "refused", "failed")
GOAL_ROUNDS_PER_OUTAGE = 1  # docs/threat-model.md#what-an-outage-costs: the upload the relay has not got
GOAL_LOCAL_PER_OUTAGE = 1  # docs/permissions.md: what a relay outage costs a member (local mode)


@dataclass
class Plan:
    duration: float = 1800.0
    interval: float = 15.0
    kill_at: float = 600.0
    outage_at: float = 1200.0
    outage: float = 120.0

    @classmethod
    def of(cls, quick: bool, duration: float | None = None, interval: float | None = None,
           outage: float | None = None) -> "Plan":
        d = duration or (300.0 if quick else 1800.0)
        return cls(d, interval or (10.0 if quick else 15.0), d / 3, 2 * d / 3, outage or (40.0 if quick else 120.0))


@dataclass
class Watch:
    """What the driver saw, second by second (wall-clock times, time.time())."""

    outcomes: dict[int, str] = field(default_factory=dict)  # round -> its latest status at the aggregator
    final_at: dict[int, float] = field(default_factory=dict)  # round -> when it was first seen final
    epochs: list[tuple[float, int]] = field(default_factory=list)  # (time, epoch) at each change
    figures: list[tuple[float, int]] = field(default_factory=list)  # (time, secure round) at each new figure
    local_fresh: list[tuple[float, int]] = field(default_factory=list)  # (time, fresh local reports) at each change
    on_relay: set[str] = field(default_factory=set)  # the local member's report windows (end) seen on the relay
    events: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _key(iso: str) -> str:
    """A window end, to the millisecond, as a comparable key."""
    return datetime.fromisoformat(iso).isoformat(timespec="milliseconds")


class Driver:
    def __init__(self, net, plan: Plan, log: Callable[[str], object], trace: Path):
        from tests.localnet.demo import site_paths

        self.net, self.plan, self.log, self.trace = net, plan, log, trace
        self.w = Watch()
        self.agg = site_paths(net, AGG)
        self.sites = {m: site_paths(net, m) for m in [*SECURE, LOCAL]}
        local = self.sites[LOCAL]
        self.relay_report = net.server_files() / LOCAL / local.report_file().relative_to(local.datasites / LOCAL)

    def note(self, line: str) -> None:
        self.w.notes.append(f"{time.strftime('%H:%M:%S')} {line}")
        self.log(f"secure_soak: {line}")
        with self.trace.open("a") as f:
            f.write(json.dumps({"t": time.time(), "note": line}) + "\n")

    def poll(self) -> None:
        now, w = time.time(), self.w
        state = _json(self.agg.aggregator_secure_file)
        if state:
            if not w.epochs or w.epochs[-1][1] != state.get("epoch"):
                w.epochs.append((now, state.get("epoch")))
                self.note(f"aggregator epoch {state.get('epoch')}")
            for o in state.get("outcomes", []):
                r, s = o["round"], o["status"]
                if w.outcomes.get(r) != s:
                    if r in w.final_at and s != w.outcomes[r]:
                        self.note(f"round {r} changed its final outcome {w.outcomes[r]} -> {s}")
                    w.outcomes[r] = s
                    if s in FINAL and r not in w.final_at:
                        w.final_at[r] = now
        dash = _json(self.agg.current_file)
        if dash:
            sec = dash.get("secure")
            if sec and (not w.figures or w.figures[-1][1] != sec["round"]):
                w.figures.append((now, sec["round"]))
            fresh = dash.get("counts", {}).get("fresh", 0)
            if not w.local_fresh or w.local_fresh[-1][1] != fresh:
                w.local_fresh.append((now, fresh))
        rep = _json(self.relay_report)
        if rep and "window" in rep:
            w.on_relay.add(_key(rep["window"]["end"]))

    def sleep_until(self, t: float) -> None:
        while time.time() < t:
            self.poll()
            time.sleep(max(0.0, min(1.0, t - time.time())))

    def app(self, email: str) -> tuple[list[int], list[int], list[int]]:
        """(supervisors, workers, all) of ``email``'s app processes."""
        procs = self.net.app_processes(email)
        sups = [p for p, (_, cmd) in procs.items() if ".runner " in cmd and "--worker" not in cmd]
        workers = [p for p, (_, cmd) in procs.items() if "--worker" in cmd]
        return sups, workers, list(procs)

    def kill_aggregator(self) -> None:
        sups, workers, every = self.app(AGG)
        self.note(f"SIGKILL to the aggregator's app: supervisor {sups}, worker {workers}, all {every}")
        self.w.events["kill"] = time.time()
        for pid in every:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 120
        while time.time() < deadline:
            self.poll()
            new_sups, new_workers, _ = self.app(AGG)
            if new_sups and not set(new_sups) & set(sups) and "restarted" not in self.w.events:
                self.w.events["restarted"] = time.time()
                self.note(f"SyftBox started run.sh again: supervisor {new_sups} "
                          f"{self.w.events['restarted'] - self.w.events['kill']:.1f} s after the kill")
            if new_workers and not set(new_workers) & set(workers):
                self.w.events["worker_back"] = time.time()
                self.note(f"new aggregator worker {new_workers} "
                          f"{self.w.events['worker_back'] - self.w.events['kill']:.1f} s after the kill")
                return
            time.sleep(0.5)
        self.note("the aggregator's app did not come back within 120 s of the kill")

    def outage(self) -> None:
        self.w.events["outage"] = time.time()
        self.net.stop_server()
        self.note(f"relay server stopped for {self.plan.outage:g} s")
        self.sleep_until(self.w.events["outage"] + self.plan.outage)
        self.net.start_server()
        self.w.events["relay_back"] = time.time()
        self.note("relay server back")

    def run(self) -> None:
        self.net.wait_for(lambda: (self.poll(), self.w.figures)[1], timeout=600, interval=1.0,
                          what="the first secure figure")
        t0 = self.w.events["first_figure"] = time.time()
        self.note(f"first secure figure (round {self.w.figures[-1][1]}): the soak's clock starts")
        self.sleep_until(t0 + self.plan.kill_at)
        self.kill_aggregator()
        self.sleep_until(t0 + self.plan.outage_at)
        self.outage()
        self.sleep_until(t0 + self.plan.duration)
        self.w.events["end"] = time.time()
        self.note("end of the soak: ledgers read; waiting for the aggregator to close what was charged")

    def ledgers(self) -> dict[str, list]:
        from shared.privacy.ledger import load_spends

        return {m: load_spends(p.ledger_file) for m, p in self.sites.items()}


def round_of(spend, interval: float) -> int:
    return round(spend.window_start.timestamp() / interval)


def budget_breaches(spends: list, budgets) -> list[str]:
    """Every rolling budget checked with each release as the newest (the ledger's own arithmetic)."""
    from shared.privacy.ledger import BudgetExceeded, _arrays, check_budgets

    out = []
    ordered = sorted(spends, key=lambda s: s.window_end)
    for i in range(1, len(ordered) + 1):
        try:
            check_budgets(_arrays(ordered[:i]), budgets)
        except BudgetExceeded as e:
            out.append(str(e))
    return out


def save_ledgers(root: Path, d: Driver) -> None:
    (root / "ledgers").mkdir(exist_ok=True)
    for m, site in d.sites.items():
        if site.ledger_file.exists():
            (root / "ledgers" / f"{m}.jsonl").write_bytes(site.ledger_file.read_bytes())


def save_watch(path: Path, w: Watch, plan: Plan) -> None:
    doc = {**w.__dict__, "on_relay": sorted(w.on_relay), "plan": plan.__dict__}
    path.write_text(json.dumps(doc, default=str))


def load_saved(root: Path) -> tuple[Watch, dict[str, list], Plan]:
    from shared.privacy.ledger import load_spends

    doc = json.loads((root / "watch.json").read_text())
    plan = Plan(**doc.pop("plan"))
    w = Watch(**{**doc, "outcomes": {int(k): v for k, v in doc["outcomes"].items()},
                 "final_at": {int(k): v for k, v in doc["final_at"].items()}, "on_relay": set(doc["on_relay"]),
                 "epochs": [tuple(x) for x in doc["epochs"]], "figures": [tuple(x) for x in doc["figures"]]})
    spends = {m: load_spends(root / "ledgers" / f"{m}.jsonl") for m in [*SECURE, LOCAL]}
    return w, spends, plan


def analyse(w: Watch, spends: dict[str, list], plan: Plan) -> tuple[list[Row], dict]:
    from shared.settings import Settings

    iv = plan.interval
    ev = w.events
    secure_rounds = {m: sorted({round_of(s, iv) for s in spends[m] if s.mechanism.startswith("secure-")})
                     for m in SECURE}
    charged = sorted(set().union(*map(set, secure_rounds.values())))
    by_outcome = {s: [r for r in charged if w.outcomes.get(r) == s] for s in FINAL}
    open_rounds = [r for r in charged if w.outcomes.get(r) not in FINAL]
    pairs = sum(len(v) for v in secure_rounds.values())

    def span(start: float, end: float) -> list[int]:
        return list(range(math.floor(start / iv) - 1, math.floor(end / iv) + 1))

    def first_figure_after(t: float) -> float | None:
        before = [r for ts, r in w.figures if ts <= t]
        last = before[-1] if before else -1
        return next((ts - t for ts, r in w.figures if ts > t and r > last), None)

    kill_back = ev.get("worker_back", ev["kill"])
    kill_fig = first_figure_after(ev["kill"])
    out_fig = first_figure_after(ev["relay_back"])
    kill_span = span(ev["kill"], ev["kill"] + (kill_fig or 0))
    out_span = span(ev["outage"], ev["relay_back"] + (out_fig or 0))

    def lost(rounds: list[int]) -> dict[str, list[int]]:
        return {m: [r for r in secure_rounds[m] if r in rounds and w.outcomes.get(r) != "published"] for m in SECURE}

    lost_kill, lost_out = lost(kill_span), lost(out_span)
    local = [s for s in spends[LOCAL] if not s.mechanism.startswith("secure-")]
    local_lost = [s for s in local if _key(s.window_end.isoformat()) not in w.on_relay]
    in_outage = [s for s in local if ev["outage"] <= s.released_at.timestamp() <= ev["relay_back"]]
    epochs_around_kill = ([e for t, e in w.epochs if t <= ev["kill"]][-1:],
                          [e for t, e in w.epochs if t > ev["kill"]])
    budgets = Settings(aggregator=AGG).budgets
    breaches = {m: budget_breaches(spends[m], budgets) for m in [*SECURE, LOCAL]}
    gap_fig = {name: _figure_gap(w.figures, ev[a], ev[b] + (f or 0)) for name, a, b, f in
               (("kill", "kill", "kill", kill_fig), ("outage", "outage", "relay_back", out_fig))}
    worst_lost_out = max(len(v) for v in lost_out.values())
    # charged while the relay was down (a round is charged at its end) vs charged before and failed for want of answers
    during_out = {m: [r for r in v if ev["outage"] <= (r + 1) * iv <= ev["relay_back"]] for m, v in lost_out.items()}
    worst_during = max(len(v) for v in during_out.values())
    worst_lost_kill = max(len(v) for v in lost_kill.values())
    new_epoch = bool(epochs_around_kill[1])
    rows = [
        Row("rounds charged by at least one member", len(charged), "rounds",
            note=f"{pairs} member-rounds charged by {len(SECURE)} members; rounds {charged[0]}-{charged[-1]}"
            if charged else "none"),
        Row("charged rounds without a final outcome at the aggregator", len(open_rounds), "rounds", goal="0",
            met=not open_rounds, note=f"{open_rounds[:20]}" if open_rounds else
            ", ".join(f"{s} {len(v)}" for s, v in by_outcome.items())),
        Row("new epoch after the aggregator's SIGKILL and restart", int(new_epoch), "", goal="0 (resumes its epoch)",
            met=not new_epoch, note=f"epoch before {epochs_around_kill[0]}, changes after {epochs_around_kill[1]}"),
        Row("charged rounds not published around the kill, worst member", worst_lost_kill, "rounds",
            note=f"rounds {kill_span[0]}-{kill_span[-1]}: " + ", ".join(
                f"{r} {w.outcomes.get(r, 'no outcome')}" for r in sorted(set().union(*map(set, lost_kill.values()))))),
        Row(f"rounds charged while the relay was down ({plan.outage:g} s), worst member", worst_during, "rounds",
            goal=f"<= {GOAL_ROUNDS_PER_OUTAGE}", met=worst_during <= GOAL_ROUNDS_PER_OUTAGE,
            note="per member: " + ", ".join(str(len(v)) for v in during_out.values())),
        Row(f"charged rounds not published around the {plan.outage:g} s relay outage, worst member", worst_lost_out,
            "rounds", note=f"rounds {out_span[0]}-{out_span[-1]}: " + ", ".join(
                f"{r} {w.outcomes.get(r, 'no outcome')}" for r in sorted(set().union(*map(set, lost_out.values()))))),
        Row("local member: releases charged while the relay was down", len(in_outage), "releases",
            goal=f"<= {GOAL_LOCAL_PER_OUTAGE} (+1 being uploaded)", met=len(in_outage) <= GOAL_LOCAL_PER_OUTAGE + 1,
            note=f"{len(local_lost)} of {len(local)} charged releases never reached the relay in the whole soak"),
        Row("SyftBox started run.sh again after the SIGKILL", ev.get("restarted", math.nan) - ev["kill"], "s",
            met="restarted" in ev),
        Row("first new secure figure after the kill", kill_fig, "s",
            note=f"gap between figures {gap_fig['kill']:.0f} s" if gap_fig["kill"] else ""),
        Row("first new secure figure after the relay came back", out_fig, "s",
            note=f"gap between figures {gap_fig['outage']:.0f} s, outage {plan.outage:g} s"
            if gap_fig["outage"] else ""),
        Row("members over a rolling budget", sum(1 for v in breaches.values() if v), "members", goal="0",
            met=not any(breaches.values())),
    ]
    details = {
        "plan": plan.__dict__, "events": ev, "charged_by_member": secure_rounds,
        "outcomes": {r: w.outcomes.get(r) for r in charged}, "open": open_rounds,
        "lost_kill": lost_kill, "lost_outage": lost_out, "charged_during_outage": during_out, "kill_span": kill_span, "outage_span": out_span,
        "local_lost": [s.window_end.isoformat() for s in local_lost], "local_releases": len(local),
        "epochs": w.epochs, "figures": w.figures, "local_fresh": w.local_fresh, "budget_breaches": breaches,
        "kill_back_s": kill_back - ev["kill"], "gap_s": gap_fig, "notes": w.notes,
    }
    return rows, details


def _figure_gap(figures: list[tuple[float, int]], start: float, end: float) -> float | None:
    """The longest time without a new secure figure between ``start`` and ``end`` (the event and the first figure
    after it), counted from the last figure before ``start``."""
    before = [t for t, _ in figures if t <= start]
    after = [t for t, _ in figures if t >= end]
    if not before or not after:
        return None
    return after[0] - before[-1]


def soak(root: Path, plan: Plan, log: Callable[[str], object]) -> Result:
    from tests.localnet.demo import install_tracker, secure_settings
    from tests.localnet.network import LocalNetwork

    res = Result("secure_soak", f"Secure soak on a local SyftBox network: {plan.duration / 60:g} min, aggregator "
                                f"SIGKILLed at {plan.kill_at / 60:g} min, relay down {plan.outage:g} s at "
                                f"{plan.outage_at / 60:g} min ({len(SECURE)} secure members, 1 local, "
                                f"{plan.interval:g} s rounds)")
    root.mkdir(parents=True, exist_ok=True)
    trace = root / "soak.jsonl"
    with LocalNetwork(root / "net", Path(sys.prefix) / "bin", [*SECURE, LOCAL, AGG], log=log) as net:
        settings = secure_settings(AGG, plan.interval) + "stale_after_s = 60\nmin_members = 1\n"
        install_tracker(net, SECURE, AGG, settings)
        net.install_app(net_repo(), symlink=False, emails=[LOCAL],
                        files={"cpu_tracker.toml": f'aggregator = "{AGG}"\ninterval_s = {plan.interval}\n'})
        d = Driver(net, plan, log, trace)
        try:
            d.run()
            spends = d.ledgers()
            save_ledgers(root, d)
            charged = {round_of(s, plan.interval) for m in SECURE for s in spends[m]
                       if s.mechanism.startswith("secure-")}
            d.sleep_until(time.time() + 10 * plan.interval)  # reveal_rounds + deadline: every charged round can close
            deadline = time.time() + 10 * plan.interval
            while time.time() < deadline and any(d.w.outcomes.get(r) not in FINAL for r in charged):
                d.sleep_until(time.time() + 2)
        finally:  # whatever happened, what was seen is kept: --analyse computes the figures again from it
            save_watch(root / "watch.json", d.w, plan)
            if not (root / "ledgers").exists():
                save_ledgers(root, d)
        res.rows, res.details = analyse(d.w, spends, plan)
    (root / "result.json").write_text(json.dumps({"rows": [r.__dict__ for r in res.rows], "details": res.details},
                                                 default=str, indent=1))
    res.notes += [
        "Rounds charged: from every secure member's own ledger (a secure spend's window is its round); outcomes: "
        "the aggregator's private round record read every second (it keeps 64 rounds, so the driver accumulates).",
        "Not published around an event: rounds from the one before the event to the first new figure after it that a "
        "member charged and the aggregator refused or failed (or never closed).",
        "Local releases lost: ledger entries of the local-mode member whose report never appeared in the relay's "
        "stored copy (polled every second; a report stays there for a whole window).",
    ]
    return res


def net_repo() -> Path:
    from tests.localnet.demo import REPO

    return REPO


def run(ctx) -> Result:
    root = Path(tempfile.mkdtemp(prefix="secure_soak_", dir=ctx.work))
    return soak(root, Plan.of(ctx.quick), ctx.log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.secure_soak")
    p.add_argument("--root", type=Path, required=True, help="an empty folder (kept: logs, trace, result.json)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--duration", type=float)
    p.add_argument("--interval", type=float)
    p.add_argument("--outage", type=float)
    p.add_argument("--analyse", action="store_true", help="compute the figures again from a finished run's --root")
    args = p.parse_args(argv)
    if args.analyse:
        res = Result("secure_soak", "again")
        res.rows, res.details = analyse(*load_saved(args.root))
    else:
        plan = Plan.of(args.quick, args.duration, args.interval, args.outage)
        res = soak(args.root, plan, lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True))
    for row in res.rows:
        print(f"{row.figure}: {row.value} {row.unit} {row.goal} {'' if row.met is None else row.met} {row.note}")
    return 0 if all(r.met is not False for r in res.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
