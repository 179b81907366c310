"""What secure aggregation costs one member: CPU per round and bytes, at k = 1,000, 10,000 and 100,000 members.

The member is the real one (``cpu_tracker_member.secure.SecureMember``): it reads and checks the signed epoch against
its own minimums, derives its neighbours from the ring, reads its neighbours' did.json, charges its ledger, builds
its upload (quantized value, noise share, masks, Shamir split, sealed shares, MAC), then answers its inbox: signs its
view of the round just closed, verifies its neighbours' signed views of the round before, checks their consistency
and reveals (sealed for the aggregator). Its neighbours are real keys too: the bench writes their did.json and, as
the aggregator would, each round's inbox with their sealed shares and signed views. Only the member's work is timed
(process CPU time); the costs it pays once an epoch (reading the epoch, ordering the ring) are shown apart and
spread over the epoch's rounds in the per-round figure.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from cpu_tracker_aggregator.secure import plan_epoch
from cpu_tracker_member.secure import SecureMember, epoch_epsilon
from shared.secure import identity, secagg
from shared.atomic import atomic_write_json
from shared.privacy.ledger import Ledger, LedgerKeeper
from shared.logs import Problems
from shared.paths import Paths
from shared.wire.secure_schema import b64, epoch_hash, inbox_file, inbox_round, message, signed_file
from shared.settings import Settings
from tests.bench.common import Result, Row

WINDOW_S = 20.0
AGG = "aggregator@bench.example.org"
ME = "me@bench.example.org"
START = 4_000_000


def _t(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def member_cost(work: Path, k: int, rounds: int) -> dict:
    """CPU seconds of one member's rounds in a cohort of k, and the bytes it moves."""
    root = work / f"member-k{k}"
    shutil.rmtree(root, ignore_errors=True)
    me = Paths(root / ME, ME)
    agg = Paths(root / AGG, AGG)
    me.datasites.mkdir(parents=True)
    (root / AGG).mkdir()
    (agg.data_dir / "datasites").symlink_to(me.datasites)  # one mirror for both
    settings = Settings(aggregator=AGG, mode="secure", interval_s=WINDOW_S)
    agg_id = identity.load_or_create(agg)
    cohort = sorted([f"x{i:06d}@bench.example.org" for i in range(k - 1)] + [ME])
    epoch = plan_epoch(1, cohort, settings, AGG, START, _t(START * WINDOW_S), seed=secrets.token_bytes(32))
    raw = signed_file(epoch, agg_id.sign)
    agg.epoch_file().parent.mkdir(parents=True)
    agg.epoch_file().write_bytes(raw)
    h = epoch_hash(message(epoch.kind, raw[:raw.rindex(b',"signature"')] + b"}"))
    peers = epoch.neighbours(ME)
    ids = {p: identity.Identity.generate(p) for p in peers}
    for p, i in ids.items():
        atomic_write_json(me.did_file(p), i.did_document())
    ledger = Ledger(me.ledger_file, settings.budgets)
    epoch_epsilon(epoch)  # the accounting libraries' imports: once a process, not an epoch
    problems = Problems(logging.getLogger("bench.member"))
    member = SecureMember(me, settings, problems, LedgerKeeper(lambda: ledger, problems))
    started = time.process_time()
    assert member.ready()
    keys = member._keys
    mine = identity.load_or_create(me)
    pair = {p: secagg.pair_secret(i.prekey_private, i.public.prekey, mine.public.prekey, me=p, peer=ME,
                                  aggregator=AGG) for p, i in ids.items()}
    t = epoch.threshold
    cpu, sizes = [], {}
    once = None
    for n, r in enumerate(range(START, START + rounds)):
        c0 = time.process_time()
        assert member.publish(37.5, _t(r * WINDOW_S), _t((r + 1) * WINDOW_S)), "no upload"
        c1 = time.process_time()
        if once is None:
            once = c1 - started  # identity, pins, join, the epoch read and checked, the ring ordered, pair secrets
        entries = [_entry(epoch, h, r, ME, peers, pair, t, with_views=False)]
        if n:
            entries.append(_entry(epoch, h, r - 1, ME, peers, pair, t, with_views=True, ids=ids))
        body = inbox_file(ME, _t((r + 1) * WINDOW_S + 11), entries, keys["inbox"])
        agg.inbox_file(ME).parent.mkdir(parents=True, exist_ok=True)
        agg.inbox_file(ME).write_bytes(body)
        c2 = time.process_time()
        member.answer()
        c3 = time.process_time()
        if n >= 2:
            cpu.append((c1 - c0) + (c3 - c2))
        sizes = {"upload": me.upload_file(r).stat().st_size, "answers": me.answers_file().stat().st_size,
                 "inbox": len(body), "epoch": len(raw)}
    answered = r - 1 in member._state.answered
    shutil.rmtree(root, ignore_errors=True)
    return {"k": k, "degree": epoch.degree, "cpu_round_s": sum(cpu) / len(cpu), "once_s": once,
            "rounds_per_epoch": epoch.rounds, "bytes": sizes, "revealed": answered}


def _entry(epoch, h, r, me, peers, pair, t, *, with_views: bool, ids=None) -> bytes:
    """Round r of the member's inbox as the aggregator writes it: its neighbours' sealed shares (first time) or their
    signed views (all survived)."""
    survivors = len(epoch.cohort)
    sealed = b"" if with_views else b"".join(
        secagg.seal_share(secagg.share_key(pair[p], h, r, p, me), secagg.new_seed()) for p in peers)
    views = b""
    if with_views:
        views = secagg.pack_bits([True] * len(peers))
        for p in peers:
            bits = tuple(True for _ in epoch.neighbours(p))
            sig = ids[p].sign(secagg.view_message(secagg.View(h, r, p, survivors, bits)))
            views += secagg.view_record(survivors, secagg.pack_bits(bits), sig)
    return inbox_round(round=r, epoch_hash=b64(h), status="unmasking", survived=True, survivors=survivors,
                       statuses=secagg.pack_bits([True] * len(peers)), sealed=sealed, views=views)


def run(ctx) -> Result:
    res = Result("secure_protocol", "Secure aggregation: one member's CPU and bytes per round at fleet sizes")
    sizes = (1000, 10_000) if ctx.quick else (1000, 10_000, 100_000)
    rounds = 6 if ctx.quick else 12
    figures = {}
    for k in sizes:
        f = figures[k] = member_cost(ctx.work, k, rounds)
        per_round = f["cpu_round_s"] + f["once_s"] / f["rounds_per_epoch"]
        core = per_round / WINDOW_S
        ctx.log(f"secure_protocol: k={k}: {1000 * f['cpu_round_s']:.1f} ms a round, {f['once_s']:.2f} s once")
        res.rows.append(Row(f"member CPU per round, k = {k:,} ({f['degree']} neighbours, 20 s rounds)", 100 * core,
                            "% of a core", "", None, "<= 0.1 % of a core" if k == 10_000 else "",
                            (100 * core <= 0.1) if k == 10_000 else None,
                            f"{1000 * f['cpu_round_s']:.1f} ms a round (upload, view, {f['degree']} views verified, "
                            f"reveal) + {f['once_s']:.2f} s once an epoch (epoch read and checked, ring, "
                            f"{f['degree']} key agreements) over its {f['rounds_per_epoch']} rounds"
                            + ("" if f["revealed"] else "; NOT REVEALED: the consistency check failed")))
        b = f["bytes"]
        up = b["upload"] + b["answers"]
        res.rows.append(Row(f"bytes a member uploads per round, k = {k:,} (round file + answers: view and sealed "
                            "reveal)", up / 1024, "KB", "", None, "<= 4 KB" if k == 10_000 else "",
                            (up <= 4096) if k == 10_000 else None,
                            f"round file {b['upload']} B, answers {b['answers']} B; inbox read {b['inbox']} B; "
                            f"epoch {b['epoch'] / 1024:.0f} KB once an epoch"))
    res.details = figures
    res.notes.append(__doc__.split("\n\n")[1].replace("\n", " "))
    return res
