"""An adversary test double: an aggregator (or the relay) that attacks, against real members (``tests/secure_harness``).

``LyingAggregator`` is the real aggregator whose inbox entries lie as told: per round, which neighbours a member is told
dropped although they uploaded (the dropout lie, to a victim, to its neighbours, or both), whose signed views it
withholds, and views it forwards in the name of Sybil datasites it runs. Everything it writes is correctly MAC'd or
signed: it is the aggregator.

``Adversary`` then tries. It collects everything an aggregator gets (every upload, every answers file: the views
and the reveals it can open with its keys), plus what Sybils hold (the shares sealed for them, the round keys they
share with their neighbours), and checks for every member whether both halves of its masks are in its hands: t
shares of its self-mask seed and the round key with every neighbour. Where they are, it unmasks that member's upload
alone (``opened``): a test of a strategy asserts that nothing is opened, or, for the documented condition (t Sybil
neighbours), that the victim's value is recovered exactly.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag

from cpu_tracker_aggregator.secure import Round, SecureAggregator
from shared.secure import identity, secagg
from shared.wire.secure_schema import (
    Epoch,
    Inbox,
    InboxRound,
    Refused,
    SecureAnswers,
    SecureUpload,
    b64,
    b64_bytes,
    mac_file,
    read_mac,
    signed_file,
)
from shared.wire.schema import utc_now


def reveal_entries(plain: bytes, degree: int) -> list[int | bytes | None]:
    """A reveal's entries in its member's neighbour order (``secagg.pack_reveal``'s: a share as an int, a round key
    as bytes, None for nothing), from the aggregator's own reading of it (``secagg.unpack_reveal``)."""
    _, blocks, marks, keys = secagg.unpack_reveal(plain, degree)
    size = secagg.SEED_BYTES
    return [secagg.seed_value(blocks[size * i:size * (i + 1)]) if marks[i] else keys.get(i) for i in range(degree)]


log = logging.getLogger("test.adversary")


def entry_for(rnd: Round, m: str, *, told_dropped: set[str] = frozenset(), withheld: set[str] = frozenset(),
              views: dict[str, tuple[int, bytes, bytes]] | None = None, with_sealed: bool = True,
              survivors: int | None = None) -> InboxRound:
    """What ``m`` is told of round ``rnd``: the truth, except that the neighbours in ``told_dropped`` dropped, the
    views of ``withheld`` are not forwarded, ``views`` (member -> signed view) replace the ones collected, and
    ``survivors`` replaces the count."""
    g = rnd.graph
    nbrs = g[m]
    alive = {p for p in rnd.shares if p not in told_dropped}
    statuses = [p in alive for p in nbrs]
    size = secagg.SEALED_SHARE_BYTES
    blank = bytes(size * rnd.epoch.degree)  # a round already unmasked: its sealed shares are gone, send zeros
    sealed = b"".join(rnd.sealed.get(p, blank)[size * i:size * (i + 1)] for p, ok in zip(nbrs, statuses) if ok
                      for i in [bisect.bisect_left(g[p], m)]) if with_sealed else b""
    known = {**rnd.views, **(views or {})}
    got = [secagg.view_record(*known[p]) if ok and p not in withheld and p in known else None
           for p, ok in zip(nbrs, statuses)]
    present = np.array([v is not None for v in got], dtype=bool)
    rows = np.frombuffer(b"".join(v or bytes(secagg.view_size(rnd.epoch.degree)) for v in got), dtype=np.uint8)
    packed = secagg.pack_views(present, rows.reshape(len(got), -1)) if present.any() else b""
    return InboxRound(round=rnd.number, epoch_hash=b64(rnd.h), status="unmasking", survived=m in rnd.shares,
                      survivors=len(rnd.shares) if survivors is None else survivors,
                      statuses=b64(secagg.pack_bits(statuses)), sealed=b64(sealed), views=b64(packed) if packed else "")


@dataclass
class LyingAggregator(SecureAggregator):
    """The real aggregator, lying in its inboxes. ``lies[r][m]``: neighbours member m is told dropped in round r;
    ``withheld[r][m]``: neighbours whose views m is not given; ``forged[r][s]``: a view forwarded as Sybil s's."""

    lies: dict[int, dict[str, set[str]]] = field(default_factory=dict)
    withheld: dict[int, dict[str, set[str]]] = field(default_factory=dict)
    forged: dict[int, dict[str, tuple[int, bytes, bytes]]] = field(default_factory=dict)

    def _inbox_entry(self, rnd: Round, m: str) -> bytes:
        r = rnd.number
        return entry_for(rnd, m, told_dropped=self.lies.get(r, {}).get(m, set()),
                         withheld=self.withheld.get(r, {}).get(m, set()), views=self.forged.get(r, {}),
                         with_sealed=m not in rnd.views).model_dump_json().encode()


class Adversary:
    """What an aggregator can do with what it gets; ``sybils``: members whose datasites (and keys) it runs."""

    def __init__(self, net, sybils=()):
        self.net, self.agg = net, net.agg
        self.sybils = {s: identity.load_or_create(net.secure[s].paths) for s in sybils}
        self.loot: dict[tuple[int, bytes, str], bytes] = {}  # (round, epoch hash, member) -> its sealed reveal
        net.observers.append(self.harvest)

    def harvest(self) -> None:
        """Keep every reveal any member's answers file holds now (members drop them once the aggregator has them)."""
        for m in self.net.members:
            path = self.agg.paths.answers_file(m)
            keys = self.agg._member_keys(m) if path.exists() else None
            if keys is None:
                continue
            try:
                answers = read_mac(path.read_bytes(), SecureAnswers, keys["answers"])
            except Refused:
                continue
            for sr in answers.reveals:
                self.loot.setdefault((sr.round, b64_bytes(sr.epoch_hash), m), b64_bytes(sr.sealed))

    # -- writing files as the aggregator ------------------------------------------------------------------
    def honest_entry(self, r: int, m: str) -> InboxRound:
        return entry_for(self.agg.rounds[r], m)

    def write_inbox(self, m: str, entries: list[InboxRound]) -> None:
        body = Inbox(member=m, created_at=utc_now(), rounds=entries)
        self.agg.paths.inbox_file(m).write_bytes(mac_file(body, self.agg._member_keys(m)["inbox"]))

    def write_epoch(self, epoch: Epoch) -> None:
        self.agg.paths.epoch_file().write_bytes(signed_file(epoch, self.agg._me.sign))

    def sybil_view(self, r: int, sybil: str, statuses: dict[str, bool], survivors: int) -> tuple[int, bytes, bytes]:
        """A view signed with a Sybil's own identity key, saying whatever the adversary needs."""
        epoch, h = self.agg.epoch, self.agg.epoch_h
        bits = tuple(statuses.get(p, True) for p in epoch.neighbours(sybil))
        view = secagg.View(h, r, sybil, survivors, bits)
        return survivors, secagg.pack_bits(bits), self.sybils[sybil].sign(secagg.view_message(view))

    # -- collecting and trying ----------------------------------------------------------------------
    def _pair(self, sybil: str, peer: str) -> bytes:
        me = self.sybils[sybil]
        return secagg.pair_secret(me.prekey_private, me.public.prekey, self.agg._book.keys_of(peer).prekey, me=sybil,
                                  peer=peer, aggregator=self.agg.paths.email)

    def uploads(self, r: int, h: bytes) -> dict[str, SecureUpload]:
        out = {}
        for m in self.net.members:
            path = self.agg.paths.upload_file(r, m)
            if path.exists():
                up = read_mac(path.read_bytes(), SecureUpload, self.agg._member_keys(m)["upload"])
                if up.epoch_hash == b64(h) and up.vector:
                    out[m] = up
        return out

    def reveals(self, r: int, h: bytes, degree: int) -> dict[str, list]:
        """Every reveal of round r (under epoch hash h) any member ever wrote, opened with the aggregator's keys."""
        self.harvest()
        out = {}
        for (rr, hh, m), sealed in self.loot.items():
            if rr == r and hh == h:
                plain = secagg.unseal(self.agg._member_keys(m)["reveal"], sealed, secagg.reveal_aad(h, r))
                out[m] = reveal_entries(plain, degree)
        return out

    def opened(self, r: int, h: bytes | None = None) -> dict[str, list[int]]:
        """Every honest member of round r whose upload the adversary can unmask alone, with the value (vector plus
        noise share) it recovers: it holds t shares of the member's seed (revealed by neighbours, or sealed for its
        Sybils) and the round key with every neighbour (revealed by either end, or computed by a Sybil)."""
        rnd = self.agg.rounds.get(r)
        epoch = rnd.epoch if rnd is not None else self.agg.epoch
        h = h or (rnd.h if rnd is not None else self.agg.epoch_h)
        graph = secagg.derived_graph(epoch.cohort, b64_bytes(epoch.graph_seed), epoch.degree)
        ups = self.uploads(r, h)
        rev = self.reveals(r, h, epoch.degree)
        out = {}
        for i, up in ups.items():
            if i in self.sybils:
                continue
            nbrs = graph[i]
            shares, keys = {}, {}
            sealed = b64_bytes(up.sealed)
            size = secagg.SEALED_SHARE_BYTES
            for x, j in enumerate(nbrs, start=1):
                if j in self.sybils:
                    pair = self._pair(j, i)
                    try:
                        shares[x] = secagg.open_share(secagg.share_key(pair, h, r, i, j),
                                                      sealed[size * (x - 1):size * x])
                    except InvalidTag:  # sealed for another key than the one the adversary holds for j
                        pass
                    keys[j] = secagg.round_key(pair, h, r)
                    continue
                mine = rev.get(j)
                if mine is not None:
                    e = mine[graph[j].index(i)]
                    if isinstance(e, bytes):
                        keys[j] = e
                    elif e is not None:
                        shares[x] = e
                theirs = rev.get(i)
                if theirs is not None and isinstance(theirs[x - 1], bytes):
                    keys[j] = theirs[x - 1]
            if len(shares) < epoch.threshold or len(keys) < len(nbrs):
                continue
            seed = secagg.combine_seeds([shares], epoch.threshold)[0]
            y = secagg.decode_vector(up.vector, epoch.dim)
            value = secagg.unmask_sum(y, [seed], [(i, j, k) for j, k in keys.items()])
            out[i] = value.tolist()
        return out


def sent(net, m: str, r: int) -> list[int]:
    return [int(v) for v in np.asarray(net.sent[(m, r)])]
