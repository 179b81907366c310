"""What secure aggregation costs: a member's CPU per round, the bytes it uploads, and the aggregator's time per round.

In-process, with the roles' real code: ``cpu_tracker_member.secure`` builds each upload (vector, noise share,
masks, Shamir split of the self-mask seed, sealed shares) and answers an inbox (unsealing its neighbours' shares);
``cpu_tracker_aggregator.secure`` unmasks (rebuilds every survivor's seed from its shares, removes the masks).
The cohort is k = 1,000 with the logarithmic ring graph (20 neighbours, threshold 11), 20 s windows; the aggregator
at k = 10,000 (28 neighbours, threshold 15) is timed on a sample of survivors and scaled to the cohort, because its
cost is one Shamir rebuild per survivor plus one pass over the vectors (both linear in k).
"""

from __future__ import annotations

import base64
import time
from datetime import datetime, timezone

import numpy as np

from cpu_tracker_aggregator.secure import plan_epoch, unmask
from shared import secagg
from shared.secure_schema import Reveal, SecureUpload
from shared.settings import Settings
from tests.bench.common import Result, Row

WINDOW_S = 20.0
AGG = "agg@example.org"


def _cohort(k: int):
    members = [f"m{i:05d}@example.org" for i in range(k)]
    priv = {m: secagg.new_private_key() for m in members[:64]}  # keys for the members whose side is timed
    pub = {m: base64.b64encode(secagg.public_key(priv.get(m) or secagg.new_private_key())).decode()
           for m in members[:64]}
    filler = base64.b64encode(secagg.public_key(secagg.new_private_key())).decode()
    keys = {m: pub.get(m, filler) for m in members}
    settings = Settings(aggregator=AGG, mode="secure", interval_s=WINDOW_S)
    epoch = plan_epoch(1, keys, settings, AGG, 1000, datetime.now(timezone.utc))
    return members, priv, epoch


def member_round_ms(epoch, me, priv) -> tuple[float, int]:
    """CPU ms of one member's round (upload and reveals for its neighbours) and the upload's bytes."""
    import cpu_tracker_member.secure as msec

    salt = base64.b64decode(epoch.salt)
    peers = epoch.neighbours[me]
    started = time.process_time()
    pairs = {p: secagg.pair_secret(priv, base64.b64decode(epoch.key_of(p)), me=me, peer=p, epoch_salt=salt)
             for p in peers}
    setup = time.process_time() - started  # once per epoch (an hour of rounds): reported apart
    rounds = 20
    started = time.process_time()
    for r in range(rounds):
        values = msec.window_vector(37.5, epoch)
        seed = secagg.new_seed()
        y = secagg.masked(values, self_seed=seed, round_keys={p: secagg.round_key(pairs[p], r) for p in peers}, me=me)
        shares = secagg.split_seed(seed, peers, epoch.threshold)
        sealed = {p: secagg.seal(secagg.seal_key(pairs[p]), secagg.pack_share(shares[p]),
                                 secagg.share_aad(1, r, me, p)) for p in peers}
        # answering the inbox: open one sealed share per neighbour (here our own, same cost), reveal them
        opened = {p: base64.b64encode(secagg.unseal(secagg.seal_key(pairs[p]), sealed[p],
                                                    secagg.share_aad(1, r, me, p))).decode() for p in peers}
        upload = SecureUpload(app_version="bench", email=me, epoch=1, round=r, created_at=datetime.now(timezone.utc),
                              vector=secagg.encode_vector(y), sealed=sealed, reveals=[Reveal(round=r + 100, shares=opened)])
        body = upload.model_dump_json().encode()
    per_round = (time.process_time() - started) / rounds
    return 1000 * (per_round + setup / epoch.rounds), len(body)


def aggregator_round_s(epoch, sample: int) -> tuple[float, float]:
    """Seconds for one round's unmasking at the epoch's cohort size (no dropout), measured on ``sample`` survivors and
    scaled; and the seconds the Shamir rebuild alone takes for the sample (shared.shamir)."""
    members = epoch.emails()
    dim = epoch.dim
    survivors = members[:sample]
    vectors, reveals = {}, {m: Reveal(round=0) for m in members}
    shares_of = {}
    for m in survivors:
        seed = secagg.new_seed()
        vectors[m] = secagg.prg(seed, dim) + np.arange(dim, dtype=np.uint64)
        shares_of[m] = secagg.split_seed(seed, epoch.neighbours[m], epoch.threshold)
    sh = {m: {} for m in members}
    for m in survivors:
        for p, share in shares_of[m].items():
            sh[p][m] = base64.b64encode(secagg.pack_share(share)).decode()
    reveals = {p: Reveal(round=0, shares=s) for p, s in sh.items() if s}
    # the pairwise masks cancel over a full cohort; for a sample they would not, so time them apart: unmask sees
    # only self masks here (identical work per survivor)
    started = time.perf_counter()
    unmask(epoch, vectors, [], reveals)
    elapsed = time.perf_counter() - started
    started = time.perf_counter()
    secagg.combine_seeds([[secagg.unpack_share(base64.b64decode(reveals[j].shares[m]))
                           for j in epoch.neighbours[m] if m in reveals.get(j, Reveal(round=0)).shares]
                          for m in survivors], epoch.threshold)
    shamir = time.perf_counter() - started
    return elapsed * len(members) / sample, shamir


def run(ctx) -> Result:
    res = Result("secure_protocol", "Secure aggregation: member cost, upload size, aggregator time per round")
    members, priv, epoch = _cohort(1000)
    me = members[0]
    ms, size = member_round_ms(epoch, me, priv[me])
    core = ms / (WINDOW_S * 1000)
    res.rows.append(Row(f"member CPU per round, k = 1,000, {len(epoch.neighbours[me])} neighbours, 20 s windows",
                        100 * core, "% of a core", "", None, "<= 0.1 % of a core", 100 * core <= 0.1,
                        f"{ms:.1f} ms a round (the epoch's key agreements spread over its {epoch.rounds} rounds)"))
    res.rows.append(Row("bytes uploaded per member per round (masked vector, sealed shares, reveals)", size / 1024,
                        "KB", "", None, "<= 4 KB", size <= 4096))
    _, _, big = _cohort(10_000)
    sample = 100 if ctx.quick else 300
    seconds, shamir_s = aggregator_round_s(big, sample)
    res.rows.append(Row(f"aggregator time per round, k = 10,000 ({len(big.neighbours[big.emails()[0]])} neighbours, "
                        f"threshold {big.threshold})", seconds, "s", "", None, "<= 2 s", seconds <= 2.0,
                        f"measured on {sample} survivors and scaled (the Shamir rebuild alone: "
                        f"{shamir_s * len(big.emails()) / sample:.2f} s)"))
    return res
