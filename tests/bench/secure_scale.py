"""Secure aggregation at fleet scale (issue 19): the aggregator's time per round with real files at k = 1,000 and
10,000 members and in-process at 100,000, its cost per member, and the bytes a round moves through the relay.

The aggregator is the real one (``cpu_tracker_aggregator.secure.SecureAggregator``, its real tick): it enrols the
members from their did.json and MAC'd join files, signs its epoch, reads and checks every upload, writes every inbox
(O(degree) each), collects the views and reveals, rebuilds every seed in one vectorised pass
(``shared.secure.shamir``) and publishes the figure. The k members are simulated by ``Cohort``: real identity keys and
did.json, real member-aggregator secrets, and per round an upload and an answers file per member written into the
aggregator's mirror,
built with the protocol's own primitives (``shared.secure.secagg``), so the aggregator reads exactly what honest members
send: the masked vector (its self mask from a real seed), the sealed shares, the view of the round just closed and the
sealed reveal of the round before (real shares of every surviving neighbour's seed, real round keys with dropped
ones). Three things the aggregator never opens are cheaper than a member would make them, so that 10,000 uploads are
built in seconds: the pairwise masks between two survivors (which cancel in the sum) are random words that sum to
zero, the sealed shares and the view signatures are random bytes of their exact length, and the members' values
carry no noise share. A round's aggregator time is its two ticks: the close (uploads read, inboxes written) and the
next look at the answers (views and reveals collected, the round before unmasked and published), in steady state;
each tick begins, as the aggregator's does (``Aggregator._withhold_exposed``), with the fail-closed check of every
folder it guards (the epoch folder and every inbox folder: shared/permissions.py). The product ticks every
``tick_s`` (10 s by default); the bench lets ``permissions.RACY_NS`` (2 s) of wall time pass between the end of one
tick and the start of the next (asleep: no CPU time), so that the guard meets the inbox folders as it does in the
product, written more than 2 s before, and not as stamps too recent to trust (which void its kept verdicts and would
never happen at the product's schedule). The CPU time measured is still all of each tick.

At 100,000 the same aggregator code runs in-process (``InMemoryAggregator``): member files are bytes in a dict
instead of files, and inboxes are built but not written; everything else is the real tick.
"""

from __future__ import annotations

import base64
import bisect
import json
import logging
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cpu_tracker_aggregator.aggregator import Aggregator
from cpu_tracker_aggregator.secure import SecureAggregator
from shared.secure import identity, secagg
from shared.logs import Problems
from shared.paths import Paths
from shared.permissions import RACY_NS
from shared.wire.schema import utc_now
from shared.wire.secure_schema import (
    SealedReveal,
    SecureAnswers,
    SecureJoin,
    SecureUpload,
    SignedView,
    b64,
    mac_file,
)
from shared.settings import Settings
from tests.bench.common import Result, Row, speed_reference

AGG = "aggregator@bench.example.org"
WINDOW_S = 20.0
START = 4_000_000  # a round number far from 0
SPACING_S = RACY_NS / 1e9 + 0.1  # wall time between two ticks (the product's: tick_s = 10 s), asleep


def _t(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


class Cohort:
    """k simulated members with real keys, writing into the aggregator's mirror (or into ``files``, in-process)."""

    def __init__(self, agg_paths: Paths, k: int, *, dropped: float = 0.0, files: dict | None = None):
        self.paths, self.files = agg_paths, files
        self.members = [f"m{i:06d}@bench.example.org" for i in range(k)]
        self.ids = {m: identity.Identity.generate(m) for m in self.members}
        self.agg = identity.load_or_create(agg_paths)
        self.secret = {m: secagg.aggregator_secret(self.ids[m].prekey_private, self.agg.public.prekey, member=m,
                                                   member_public=self.ids[m].public.prekey, aggregator=AGG,
                                                   aggregator_public=self.agg.public.prekey) for m in self.members}
        self.keys = {m: {k: secagg.mac_key(s, k) for k in ("join", "upload", "answers", "inbox")}
                     | {"secret": s, "reveal": secagg.reveal_key(s)} for m, s in self.secret.items()}
        self.gone = set(self.members[1::max(1, round(1 / dropped))][:round(dropped * k)]) if dropped else set()
        self.seeds: dict[int, dict[str, int]] = {}
        self.shares: dict[int, dict[str, list[int]]] = {}
        self.bytes: dict[str, int] = {}

    def _write(self, path: Path, data: bytes) -> None:
        if self.files is not None:
            self.files[str(path)] = data
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name("." + path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    def enrol(self) -> None:
        """Each member's did.json and join request."""
        for m in self.members:
            did = self.paths.did_file(m)
            if self.files is None:
                did.parent.mkdir(parents=True, exist_ok=True)
                did.write_text(json.dumps(self.ids[m].did_document(), indent=2))
                self.bytes["did.json"] = did.stat().st_size
            join = SecureJoin(email=m, identity=b64(self.ids[m].public.identity), created_at=utc_now())
            self._write(self.paths.secure_join_file(m), mac_file(join, self.keys[m]["join"]))

    def setup_epoch(self, epoch, h: bytes) -> None:
        self.epoch, self.h = epoch, h
        self.graph = secagg.derived_graph(epoch.cohort, base64.b64decode(epoch.graph_seed), epoch.degree)
        self.pairs: dict[tuple[str, str], bytes] = {}

    def _pair(self, a: str, b: str) -> bytes:
        if (a, b) not in self.pairs:
            me = self.ids[a]
            self.pairs[(a, b)] = self.pairs[(b, a)] = secagg.pair_secret(
                me.prekey_private, me.public.prekey, self.ids[b].public.prekey, me=a, peer=b, aggregator=AGG)
        return self.pairs[(a, b)]

    def uploads(self, r: int) -> None:
        """Round r's uploads of every member still there."""
        e, h, g = self.epoch, self.h, self.graph
        alive = [m for m in self.members if m not in self.gone]
        dim, t = e.dim, e.threshold
        zero_sum = np.frombuffer(os.urandom(8 * dim * len(alive)), dtype="<u8").reshape(len(alive), dim).copy()
        zero_sum[-1] = -zero_sum[:-1].sum(axis=0, dtype=np.uint64)
        self.seeds[r], self.shares[r] = {}, {}
        for i, m in enumerate(alive):
            seed = secagg.new_seed()
            self.seeds[r][m] = seed
            # a tuple of ints, which the garbage collector stops tracking: the simulated members' state, which the
            # product keeps in other processes, makes no work for the collector of the aggregator measured here
            self.shares[r][m] = tuple(secagg.split_seed(seed, e.degree, t))
            x = [0] * dim
            x[0] = 30 + i % 41
            x[1 + min(e.bins - 1, x[0] * e.bins // 100)] = 1
            y = np.array(x, dtype=np.uint64) + secagg.seed_stream(seed, dim) + zero_sum[i]
            for d in g[m]:
                if d in self.gone:  # the mask with a dropped neighbour does not cancel: a real one
                    k = secagg.round_key(self._pair(m, d), h, r)
                    y = y + secagg.prg(k, dim) if secagg.pair_sign(m, d) > 0 else y - secagg.prg(k, dim)
            up = SecureUpload(app_version="bench", email=m, epoch=e.epoch, epoch_hash=b64(h), round=r,
                              created_at=utc_now(), vector=secagg.encode_vector(y),
                              sealed=b64(os.urandom(e.degree * secagg.SEALED_SHARE_BYTES)), unit=e.unit, epsilon=1.0)
            body = mac_file(up, self.keys[m]["upload"])
            self.bytes["upload"] = len(body)
            self._write(self.paths.upload_file(r, m), body)

    def answers(self, r: int) -> None:
        """After round r closed: each survivor's view of r and its sealed reveal of r - 1."""
        e, h, g = self.epoch, self.h, self.graph
        survivors = len(self.seeds[r])
        for m in self.members:
            if m in self.gone:
                continue
            view = SignedView(round=r, epoch_hash=b64(h), survivors=survivors,
                              statuses=b64(secagg.pack_bits([p not in self.gone for p in g[m]])),
                              signature=b64(os.urandom(64)))
            reveals = []
            if r - 1 in self.shares:
                entries = [self.shares[r - 1][p][bisect.bisect_left(g[p], m)] if p not in self.gone
                           else secagg.round_key(self._pair(m, p), h, r - 1) for p in g[m]]
                sealed = secagg.seal(self.keys[m]["reveal"], secagg.pack_reveal(r - 1, entries),
                                     secagg.reveal_aad(h, r - 1))
                reveals.append(SealedReveal(round=r - 1, epoch_hash=b64(h), sealed=b64(sealed)))
            body = mac_file(SecureAnswers(email=m, created_at=utc_now(), views=[view], reveals=reveals),
                            self.keys[m]["answers"])
            self.bytes["answers"] = len(body)
            self._write(self.paths.answers_file(m), body)
        for old in [x for x in self.shares if x < r - 1]:
            del self.shares[old], self.seeds[old]


class InMemoryAggregator(SecureAggregator):
    """The real aggregator reading member files from a dict and building inboxes without writing them."""

    files: dict
    cohort: Cohort

    def _read_bytes(self, path, st=None):
        return self.files.get(str(path))

    def _member_file(self, path, model, key, problem, *, keep=True):
        from shared.wire.secure_schema import read_mac

        raw = self.files.get(path)
        hit = self._files.get(path)
        if hit is not None and hit[0] is raw:
            return hit[1] if keep else None
        parsed = None if raw is None else read_mac(raw, model, key)
        self._files[path] = (raw, parsed if keep else None)
        return parsed

    def _member_keys(self, member):
        return self.cohort.keys.get(member)

    def _enrolled(self, current):
        return self.cohort.members

    def _write_inboxes(self, now, current):
        self.inbox_sizes = [len(b) for b in self.inbox_bodies(now, current).values()]


def run_cohort(work: Path, k: int, rounds: int, *, dropped: float = 0.0, in_memory: bool = False, log=print) -> dict:
    """Enrol k members, run ``rounds`` rounds, and time the aggregator's two ticks of each steady-state round."""
    root = work / f"k{k}{'-mem' if in_memory else ''}{'-drop' if dropped else ''}"
    shutil.rmtree(root, ignore_errors=True)
    paths = Paths(root / "agg", AGG)
    (paths.datasites).mkdir(parents=True)
    settings = Settings(aggregator=AGG, mode="secure", interval_s=WINDOW_S, role="aggregator")
    files = {} if in_memory else None
    started = time.perf_counter()
    cohort = Cohort(paths, k, dropped=dropped, files=files)
    cohort.enrol()
    log(f"secure_scale: {k} members enrolled in {time.perf_counter() - started:.0f} s")
    if in_memory:
        agg = InMemoryAggregator(paths, settings, Problems(logging.getLogger("bench.secure")))
        agg.files, agg.cohort = files, cohort
    else:
        agg = SecureAggregator(paths, settings, Problems(logging.getLogger("bench.secure")))
    guarding = Aggregator(paths, settings, agg.problems) if not in_memory else None
    guard_cpu: list[float] = []
    last = [-1e9]  # when the last tick ended (time.monotonic)

    def pause() -> None:
        """With files, asleep until RACY_NS after the last tick ended (the product's ticks are tick_s apart)."""
        if guarding is not None:
            time.sleep(max(0.0, last[0] + SPACING_S - time.monotonic()))

    def tick(now: datetime) -> None:
        """The aggregator's tick as far as secure mode goes: the guarded folders checked, then the rounds."""
        if guarding is not None:
            c = time.process_time()
            guarding._withhold_exposed()
            guard_cpu.append(time.process_time() - c)
        agg.tick(now)
        last[0] = time.monotonic()

    if guarding is not None:
        guarding.features["secure"].rounds = agg
    w = WINDOW_S
    t0, c0 = time.perf_counter(), time.process_time()
    tick(_t(START * w + 1))
    epoch_s, epoch_cpu = time.perf_counter() - t0, time.process_time() - c0
    e = agg.epoch
    assert e is not None and len(e.cohort) == k, "the aggregator planned no epoch"
    cohort.setup_epoch(e, agg.epoch_h)
    per_round, cpu_round, guard_round, published, speeds = [], [], [], [], []
    for r in range(e.first_round, e.first_round + rounds):
        cohort.uploads(r)
        pause()
        t0, c0 = time.perf_counter(), time.process_time()
        tick(_t((r + 1) * w + e.deadline_s + 0.5))
        close_s, close_cpu = time.perf_counter() - t0, time.process_time() - c0
        cohort.answers(r)
        pause()
        t0, c0 = time.perf_counter(), time.process_time()
        tick(_t((r + 1) * w + e.deadline_s + 1.5))
        look_s, look_cpu = time.perf_counter() - t0, time.process_time() - c0
        if r >= e.first_round + 3:  # steady state (the first figure's imports and first writes behind): a round closing and the one before being unmasked
            per_round.append(close_s + look_s)
            cpu_round.append(close_cpu + look_cpu)
            guard_round.append(sum(guard_cpu[-2:]))
            speeds.append(speed_reference(1_000_000))  # untimed, between rounds: the host's speed now
        if agg.figure is not None and agg.figure.round == r - 1:
            published.append(r - 1)
        log(f"secure_scale: k={k} round {r}: close {close_s:.2f} s, answers and unmask {look_s:.2f} s")
    missed = [r for r in range(e.first_round, e.first_round + rounds - 1) if r not in published]
    assert not missed, f"rounds {missed} were not published at k = {k}: the timings would not be a round's"
    sizes = {
        "upload": cohort.bytes.get("upload", 0), "answers": cohort.bytes.get("answers", 0),
        "did.json": cohort.bytes.get("did.json", 0),
    }
    if in_memory:
        sizes["inbox"] = int(np.median(agg.inbox_sizes))
    else:
        member = cohort.members[len(cohort.members) // 2]
        sizes["inbox"] = paths.inbox_file(member).stat().st_size
        sizes["epoch"] = paths.epoch_file().stat().st_size
        sizes["rounds.json"] = paths.rounds_file().stat().st_size
        sizes["epoch permission files"] = sum(p.stat().st_size for p in paths.epoch_dir().glob("sy*.yaml"))
    out = {"k": k, "degree": e.degree, "threshold": e.threshold, "round_s": float(np.median(per_round)),
           "round_worst_s": max(per_round), "round_cpu_s": float(np.median(cpu_round)), "epoch_s": epoch_s,
           "guard_cpu_s": float(np.median(guard_round)) if guard_round and guarding is not None else None,
           "epoch_cpu_s": epoch_cpu, "published": published, "bytes": sizes, "speed_s": float(np.median(speeds)),
           "statuses": [x.status for x in agg.recent]}
    if not in_memory:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _guard_words(f: dict) -> str:
    g = f.get("guard_cpu_s")
    return "" if g is None else f"; of which the guarded folders' check at both ticks {g:.2f} s"


def _speed_words(f: dict) -> str:
    """The round in units of the machine's speed during it (``speed_reference``, sampled after every steady-state
    round: a sample taken minutes apart from the rounds missed the host's swings): comparable across hours."""
    return f"; {f['round_cpu_s'] / f['speed_s']:.1f} x the speed reference ({f['speed_s']:.2f} s, between its rounds)"


def run(ctx) -> Result:
    res = Result("secure_scale", "Secure aggregation at fleet scale: the aggregator's time per round and the bytes "
                 "a round moves")
    sizes = [(1000, False), (10_000, False)] + ([] if ctx.quick else [(100_000, True)])
    rounds = 4 if ctx.quick else 7  # the median of 4 steady-state rounds: a round's CPU time moves by ±15 % on this host
    figures = {}
    for k, mem in sizes:
        figures[(k, mem)] = f = run_cohort(ctx.work, k, rounds if k < 100_000 else 4, in_memory=mem, log=ctx.log)
        where = "in-process" if mem else "real files"
        goal = "<= 2 s" if k == 10_000 and not mem else ""
        res.rows.append(Row(f"aggregator CPU time per round, k = {k:,} ({where}; {f['degree']} neighbours, "
                            f"threshold {f['threshold']})", f["round_cpu_s"], "s", "", None, goal,
                            (f["round_cpu_s"] <= 2.0) if goal else None,
                            f"median over the steady-state rounds; wall {f['round_s']:.2f} s (worst "
                            f"{f['round_worst_s']:.2f} s) on a shared machine; rounds published: "
                            f"{len(f['published'])}{_guard_words(f)}{_speed_words(f)}"))
        per_member, base = 1e6 * f["round_cpu_s"] / k, 1e3 * figures[(1000, False)]["round_cpu_s"]
        res.rows.append(Row(f"aggregator time per member per round, k = {k:,} ({where})", per_member, "µs",
                            "k = 1,000", base, "does not grow with k (<= 1.5 x)",
                            None if k == 1000 else per_member <= 1.5 * base,
                            f"epoch start (enrolment, signed epoch) {f['epoch_s']:.1f} s once an hour"))
    with_drop = run_cohort(ctx.work, 10_000 if not ctx.quick else 1000, rounds, dropped=0.01, log=ctx.log)
    res.rows.append(Row(f"aggregator CPU time per round, k = {with_drop['k']:,} with 1 % dropped (real files)",
                        with_drop["round_cpu_s"], "s", "", None, "<= 2 s" if with_drop["k"] == 10_000 else "",
                        (with_drop["round_cpu_s"] <= 2.0) if with_drop["k"] == 10_000 else None,
                        f"wall {with_drop['round_s']:.2f} s; rounds published: {len(with_drop['published'])}"
                        f"{_guard_words(with_drop)}{_speed_words(with_drop)}"))
    big = figures[(10_000, False)]
    b = big["bytes"]
    up = b["upload"] + b["answers"]
    res.rows.append(Row("bytes a member uploads per round, k = 10,000 (round file, plus its answers: view and "
                        "sealed reveal)", up / 1024, "KB", "", None, "<= 4 KB", up <= 4096,
                        f"round file {b['upload']} B, answers {b['answers']} B"))
    res.rows.append(Row("inbox per member per round, k = 10,000", b["inbox"] / 1024, "KB", "", None, "<= 8 KB",
                        b["inbox"] <= 8192, "two rounds: the newest (statuses, sealed shares) and the one before "
                        "(its neighbours' signed views)"))
    res.rows.append(Row("epoch file, k = 10,000 (emails and a seed; signed)", b["epoch"] / 1024, "KB", "", None,
                        "", None, f"once an hour to each member; its permission files {b['epoch permission files']/1024:.0f} KB "
                        f"(the cohort's 10,000 readers); did.json {b['did.json']} B per member, once"))
    relay = 2 * 10_000 * (up + b["inbox"]) + 10_000 * b["rounds.json"]
    res.rows.append(Row("relay bytes per round, k = 10,000 (uploads and answers up and down, inboxes up and down, "
                        "the rounds file down)", relay / 1e6, "MB", "", None, "", None,
                        f"{relay / 10_000 / 1024:.1f} KB per member; the epoch adds "
                        f"{10_000 * (b['epoch'] + b['epoch permission files']) / 1e9:.1f} GB an hour"))
    res.details = {f"{k}{'-mem' if m else ''}": v for (k, m), v in figures.items()} | {"dropped": with_drop}
    res.notes.append(__doc__.split("\n\n")[1].replace("\n", " "))
    return res
