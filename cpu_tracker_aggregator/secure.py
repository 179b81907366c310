"""The aggregator's side of secure aggregation (protocol version 2): enrolment, signed epochs, closing rounds,
relaying the consistency round's signed views, unmasking, the rounds' outcomes and the secure figure. Its epoch and
open rounds survive a restart, and every round it opened ends published, refused or failed.

Per round r (the UTC window [r * w, (r + 1) * w)), at (r + 1) * w + deadline_s the uploads seen (MAC-checked) are
the survivors S_r; fewer than ``min_survivors`` and the round is refused (the inbox says so and nobody reveals
anything). Otherwise each member's inbox (MAC'd, O(degree)) gives its own status, its neighbours' statuses, |S_r|
and the shares its surviving neighbours sealed for it; the member signs its view into its answers file; at the next
close its inbox carries its surviving neighbours' views; each member reveals (sealed for the aggregator) once t of
them agree with its own; once every survivor's seed can be rebuilt and every mask with a dropped member removed, the
sum is unmasked (the seeds rebuilt in one vectorised pass), checked for plausibility and published. A round still
incomplete ``reveal_rounds`` rounds after it closed fails. Late uploads for a closed round are refused. Nothing here
puts a member's email into a file anyone but that member or the aggregator reads.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import math
import os
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping, Sequence
import numpy as np
from cryptography.exceptions import InvalidTag
from pydantic import ValidationError

from cpu_tracker_aggregator.reader import signature
from shared.secure import identity, secagg, shamir
from shared.atomic import (
    PRIVATE,
    atomic_write_bytes,
    atomic_write_chunks,
    atomic_write_json,
    read_regular,
    replace_file,
)
from shared.logs import Problems
from shared.paths import Paths, is_datasite_email
from shared.permissions import ensure_permissions, exposure_sentence, guard_for, withhold
from shared.privacy import SECOND_UNIT
from shared.wire.schema import SecureFigure, SecureRoundStatus
from shared.secure.secnoise import (
    FALSE_REFUSAL,
    calibrate,
    epsilon_of,
    fleet_estimate,
    fleet_mean,
    implausibility,
    mean_standard_error,
    release_event,
)
from shared.wire.secure_schema import (
    UNIT_WORDS,
    Epoch,
    inbox_file,
    inbox_round,
    Refused,
    RoundOutcome,
    RoundOutcomes,
    SecureAnswers,
    SecureJoin,
    SecureUpload,
    b64,
    b64_bytes,
    epoch_hash,
    mean_sensitivity_for,
    noise_family_for,
    read_mac,
    read_signed,
    release_seconds,
    releases_for,
    signed_file,
)
from shared.settings import Settings

log = logging.getLogger("cpu_tracker.aggregator")
MAX_MEMBER_FILE_BYTES = 1 << 16  # an upload is about 2 KB at 10,000 members, answers a few KB
ABSENT_ROUNDS = 3  # a member missing from this many closed rounds in a row is left out of the next epoch
MEAN_FRACTION = 0.8  # of each release's epsilon, on the mean coordinate; the rest on the histogram
RECENT = 12
INBOX_ROUNDS = 3  # rounds one inbox carries at most: the newest closed one and those still waiting for its reveal
NOISE_WORDS = {"dlaplace": "distributed discrete Laplace", "dgaussian": "distributed discrete Gaussian"}


# ---------------------------------------------------------------------------------------------------
# Pure steps
# ---------------------------------------------------------------------------------------------------
def scale_for(unit: str, units_per_window: int) -> int:
    """Integers per point: 1 for the window and day units; for one second of a window of n seconds, enough that the
    per-second sensitivity 100 * scale / n is about 10 steps (so rounding it up costs little)."""
    return 1 if unit != SECOND_UNIT else max(1, math.ceil(units_per_window / 10))


def plan_epoch(number: int, cohort: list[str], settings: Settings, aggregator: str, first_round: int,
               created_at: datetime, seed: bytes | None = None) -> Epoch:
    """A new epoch for ``cohort`` with the aggregator's settings: the ring's seed fresh from ``secrets`` unless given,
    the noise sized so that its epsilon holds with ``lying_floor`` honest members' shares."""
    cohort = sorted(cohort)
    n = len(cohort)
    degree = secagg.graph_degree(n)
    threshold = secagg.shamir_threshold(degree)
    floor = secagg.lying_floor(n, degree)
    min_survivors = min(n, max(settings.min_cohort, math.ceil(settings.min_survivor_fraction * n - 1e-9),
                               threshold + 1, floor))
    unit = settings.secure_unit
    w = release_seconds(unit, settings.interval_s)
    units = settings.samples_per_window
    scale = scale_for(unit, units)
    family = noise_family_for(unit)
    delta = settings.secure_delta if family == "dgaussian" else 0.0
    noise = calibrate(family=family, epsilon=settings.secure_target, delta=delta,
                      mean_sensitivity=mean_sensitivity_for(unit, scale, units), releases=releases_for(unit, w),
                      mean_fraction=MEAN_FRACTION, shares_for=floor, n_hist=settings.secure_bins)
    return Epoch(
        epoch=number, created_at=created_at, aggregator=aggregator, cohort=cohort,
        graph_seed=b64(seed if seed is not None else secrets.token_bytes(32)), degree=degree, threshold=threshold,
        min_survivors=min_survivors, window_s=w, first_round=first_round, rounds=max(10, math.ceil(3600 / w)),
        deadline_s=min(0.5 * w, 60.0), reveal_rounds=3, scale=scale, bins=settings.secure_bins,
        units_per_window=units, unit=unit, epsilon=settings.secure_target, delta=delta, noise=noise,
    )


def epoch_gap(epoch: Epoch) -> int:
    """Rounds between two epochs started for a change of the cohort (a member joining, or left out as absent): each
    epoch is a download of every email for every member, so the gap grows with the cohort, keeping that traffic
    linear in k: 60 ms a member (a minute at 1,000, 10 minutes from 10,000 on), and at least two rounds."""
    return max(2, math.ceil(min(600.0, 0.06 * len(epoch.cohort)) / epoch.window_s))


def upload_parts(upload: SecureUpload, epoch: Epoch, h_text: str, member: str, round_: int
                 ) -> tuple[np.ndarray, bytes] | str:
    """The masked vector and the sealed shares' bytes of an upload that counts for ``member`` in ``round_`` (each
    decoded once), else why it cannot count. ``h_text``: the epoch's hash in base64."""
    if upload.email != member:
        return "it names another member"
    if upload.epoch != epoch.epoch or upload.epoch_hash != h_text or upload.round != round_:
        return f"it is for epoch {upload.epoch} round {upload.round} (or another content of the epoch)"
    try:
        vector, sealed = secagg.decode_vector(upload.vector, epoch.dim), b64_bytes(upload.sealed)
    except ValueError as e:
        return str(e)
    if len(sealed) != epoch.degree * secagg.SEALED_SHARE_BYTES:
        return "its sealed shares are not one per neighbour"
    return vector, sealed


def implausible(total: np.ndarray, epoch: Epoch, survivors: int) -> str | None:
    """Why an unmasked sum cannot come from ``survivors`` honest members (None: it can): ``secnoise.implausibility``,
    which refuses an honest round with probability at most ``secnoise.FALSE_REFUSAL`` (1e-6)."""
    return implausibility([int(v) for v in total], spec=epoch.noise, survivors=survivors, scale=epoch.scale,
                          edges=epoch.bin_edges())


def secure_figure(epoch: Epoch, round_: int, total: np.ndarray, survivors: int,
                  recent: list[SecureRoundStatus]) -> SecureFigure:
    """The published figure of one unmasked round: the mean with its 95 % interval (``secnoise.fleet_mean``: the
    noise's exact spread plus the stochastic rounding's), the fleet percentiles and the share above 90 %."""
    se = mean_standard_error(epoch.noise, survivors, epoch.scale)
    mean = fleet_mean(int(total[0]), spec=epoch.noise, survivors=survivors, scale=epoch.scale)
    fleet = fleet_estimate([int(v) for v in total[1:]], spec=epoch.noise, survivors=survivors,
                           edges=epoch.bin_edges(), threshold=90.0)
    start, end = epoch.window(round_)
    eps = epsilon_of([release_event(epoch.noise, survivors)] * releases_for(epoch.unit, epoch.window_s), epoch.delta)
    return SecureFigure(
        epoch=epoch.epoch, round=round_, round_start=_utc(start), round_end=_utc(end), cohort=len(epoch.cohort),
        survivors=survivors, mean=mean.estimate, standard_error=se, ci95_low=mean.low, ci95_high=mean.high,
        **fleet, unit=epoch.unit,
        unit_words=UNIT_WORDS[epoch.unit], epsilon=eps, delta=epoch.delta, noise=NOISE_WORDS[epoch.noise.family],
        method=f"secure aggregation (pairwise and self masks, Shamir-shared seeds) of {survivors} members' quantized "
               f"window means with {NOISE_WORDS[epoch.noise.family]} noise shares; interval from the noise's "
               "distribution",
        recent=recent[-RECENT:], min_survivors=epoch.min_survivors, false_refusal=FALSE_REFUSAL,
    )


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


# ---------------------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """An epoch's derived graph with what every round needs, computed once per epoch: each member's sorted neighbours
    and, for each of them, the position this member holds in that neighbour's list (its share of that neighbour's
    seed is at x = position + 1, and the share sealed for it is that block of the neighbour's upload)."""

    graph: dict[str, list[str]]
    slot: dict[str, list[int]]
    degree: int
    all_bits: bytes  # a bitmap over one member's neighbours, every bit set
    index: dict[str, int]  # member -> its row in the arrays below (the cohort's sorted order)
    holders: np.ndarray  # [i, x - 1]: the row of member i's x-th neighbour
    at: np.ndarray  # [i, x - 1]: where member i stands in that neighbour's list (its block in that one's upload and
    #                reveal)

    @classmethod
    def of(cls, epoch: Epoch) -> "Topology":
        graph = secagg.derived_graph(epoch.cohort, b64_bytes(epoch.graph_seed), epoch.degree)
        slot = {m: [bisect.bisect_left(graph[p], m) for p in peers] for m, peers in graph.items()}
        index = {m: i for i, m in enumerate(epoch.cohort)}
        holders = np.array([[index[p] for p in graph[m]] for m in epoch.cohort], dtype=np.int64)
        at = np.array([slot[m] for m in epoch.cohort], dtype=np.int64)
        return cls(graph, slot, epoch.degree, secagg.pack_bits([True] * epoch.degree), index, holders, at)

    def gather(self, records: Mapping[str, bytes], cohort: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
        """What each member's neighbours addressed to it, in one array operation: ``records[p]`` holds p's
        ``degree`` blocks of ``size`` bytes in its neighbour order; row i of the result holds, in member i's
        neighbour order, the block each of its neighbours addressed to it (zeros from one without a record), with a
        mask of the neighbours that had one."""
        blank = bytes(self.degree * size)
        have = np.array([m in records for m in cohort], dtype=bool)
        raw = np.frombuffer(b"".join(records.get(m, blank) for m in cohort), dtype=np.uint8)
        return raw.reshape(len(cohort), self.degree, size)[self.holders, self.at], have[self.holders]

    def spread(self, records: Mapping[str, bytes], cohort: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
        """Each member's neighbours' records of ``size`` bytes (one per member, the same for all its neighbours),
        row i in member i's neighbour order, with a mask of the neighbours that had one."""
        blank = bytes(size)
        have = np.array([m in records for m in cohort], dtype=bool)
        raw = np.frombuffer(b"".join(records.get(m, blank) for m in cohort), dtype=np.uint8)
        return raw.reshape(len(cohort), size)[self.holders], have[self.holders]


@dataclass
class Round:
    """One closed round: its epoch, survivors, the sum of their masked vectors, and what their answers brought."""

    epoch: Epoch
    h: bytes
    number: int
    topo: Topology
    survivors: list[str] = field(default_factory=list)
    total: np.ndarray | None = None  # the survivors' masked vectors, summed mod 2^64
    sealed: dict[str, bytes] = field(default_factory=dict)  # survivor -> its shares sealed for its neighbours
    views: dict[str, tuple[int, bytes, bytes]] = field(default_factory=dict)  # member -> its signed view, as sent
    packed: dict[str, bytes] = field(default_factory=dict)  # member -> that view as secagg.pack_views lays it out
    shares: dict[str, None] = field(default_factory=dict)  # the survivors (their shares come in ``bodies``)
    keys: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (survivor, dropped) -> their round key
    need_keys: set[tuple[str, str]] = field(default_factory=set)
    revealed: set[str] = field(default_factory=set)
    bodies: dict[str, bytes] = field(default_factory=dict)  # member -> its shares, a block per neighbour (unmasking)
    marks: dict[str, bytes] = field(default_factory=dict)  # member -> which of its blocks are shares, where not all are
    fresh: bool = False  # reveals arrived since the last attempt to unmask
    inbox_arrays: tuple | None = None  # what this pass's inboxes need, gathered for the whole cohort (_inbox_entry)
    status: str = "unmasking"  # or refused, then published | failed
    reason: str | None = None

    @property
    def graph(self) -> dict[str, list[str]]:
        return self.topo.graph

    @property
    def h_text(self) -> str:
        return b64(self.h)

    @property
    def alive(self) -> set[str]:
        return set(self.shares)

    @property
    def dropped(self) -> list[str]:
        alive = self.shares
        return [m for m in self.epoch.cohort if m not in alive]

    def seed_shares(self) -> tuple[list[dict[int, int]], int]:
        """For each survivor (in order), t shares of its seed (the lowest t x's whose holder revealed a share that is a
        field element: seeds missing the same holders then share one set of Lagrange coefficients in
        ``shamir.combine``), and how many survivors still lack shares. Gathered from every reveal at once
        (``Topology.gather``), whether it held shares only or round keys too."""
        t, size, cohort, topo = self.epoch.threshold, secagg.SEED_BYTES, self.epoch.cohort, self.topo
        rows = np.array([topo.index[p] for p in self.survivors], dtype=np.int64)
        blocks, have = topo.gather(self.bodies, cohort, size)  # [i, c]: member i's share held by neighbour c
        blocks, ok = blocks[rows], have[rows]
        if self.marks:  # a reveal with round keys too: only its blocks marked as shares are shares
            ones = bytes([1]) * topo.degree
            marks, _ = topo.gather({m: self.marks.get(m, ones) for m in self.bodies}, cohort, 1)
            ok &= marks[rows, :, 0].astype(bool)
        top = blocks[:, :, 0]  # a field element (below 2^127 - 1): its first byte under 0x7f, or 0x7f and not all ones
        ok &= (top < 0x7F) | ((top == 0x7F) & (blocks[:, :, 1:] != 0xFF).any(axis=2))
        taken = ok & (np.cumsum(ok, axis=1) <= t)  # the lowest t x's with a share
        words = blocks[taken].view(">u8").ravel().tolist()  # flat: a list per share would wake the garbage collector
        values = [hi << 64 | lo for hi, lo in zip(words[0::2], words[1::2])]
        counts, first = taken.sum(axis=1).tolist(), taken[:, :t].all(axis=1).tolist()
        out, at, full = [], 0, list(range(1, t + 1))
        for k, n in enumerate(counts):
            xs = full if first[k] else (np.flatnonzero(taken[k]) + 1).tolist()
            out.append(dict(zip(xs, values[at:at + n])))
            at += n
        return out, sum(n < t for n in counts)

    def take_reveal(self, member: str, plain: bytes) -> None:
        """File one member's reveal (``secagg.pack_reveal``, in its neighbour order): its shares, a block per neighbour
        for ``seed_shares`` (with which blocks are shares, where not all are), and its round keys with dropped
        neighbours (from a survivor only). ValueError if malformed: then nothing of it is filed."""
        nbrs = self.topo.graph[member]
        _, blocks, marks, keys = secagg.unpack_reveal(plain, len(nbrs))
        if keys and member in self.shares:
            for i, key in keys.items():
                if nbrs[i] not in self.shares:
                    self.keys[(member, nbrs[i])] = key
                    self.need_keys.discard((member, nbrs[i]))
        self.bodies[member] = blocks
        if 0 in marks:
            self.marks[member] = marks
        self.revealed.add(member)
        self.fresh = True


@dataclass
class SecureAggregator:
    """Runs the epochs and rounds. All file I/O of the aggregator's secure mode lives here."""

    paths: Paths
    settings: Settings
    problems: Problems
    epoch: Epoch | None = None
    epoch_h: bytes | None = None
    rounds: dict[int, Round] = field(default_factory=dict)
    figure: SecureFigure | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    outcomes: dict[int, RoundOutcome] = field(default_factory=dict)
    _old: tuple[Epoch, bytes] | None = None
    _absent: dict[str, int] = field(default_factory=dict)
    _excluded: set[str] = field(default_factory=set)
    _enrolled_at: tuple[int, list[str]] | None = None
    _epoch_began: int = -10**9
    _last_closed: int | None = None
    _me: identity.Identity | None = None
    _book: identity.KeyBook | None = None
    _secrets: dict[str, tuple[bytes, dict[str, bytes]]] = field(default_factory=dict)
    _files: dict[str, tuple[tuple[int, int, int], object]] = field(default_factory=dict)
    _paths: dict[str, dict[str, str]] = field(default_factory=dict)
    _graphs: dict[bytes, Topology] = field(default_factory=dict)
    _perms_done: set[str] = field(default_factory=set)
    _restored: bool = False
    _dirty: bool = False

    def __post_init__(self) -> None:
        # a restarted aggregator resumes its epoch at once, not at its first tick: the folder checks that run before
        # that tick need the cohort (without it the cohort's own read grant looked like an exposure: issue 19's soak)
        if self.paths.aggregator_secure_file.exists() and self._ready():
            self._restore()

    def tick(self, now: datetime) -> bool:
        """One pass: epoch upkeep, close due rounds, collect views and reveals, unmask what can be, write the inboxes
        of the rounds that closed. True when the figure changed."""
        before = self.figure
        if not self._ready():
            return False
        w = self.epoch.window_s if self.epoch else release_seconds(self.settings.secure_unit, self.settings.interval_s)
        current = math.floor(now.timestamp() / w)  # the round whose window is open now
        if not self._restored:
            self._restore()
        self._epoch_upkeep(now, current)
        if self.epoch is None:
            return False
        closed = self._close_due(now, current)
        self._collect(closed)
        for r in sorted(self.rounds):
            if self.rounds[r].status == "unmasking":
                self._try_unmask(self.rounds[r], current)
        oldest = current - 2 * (self.epoch.reveal_rounds + 2)
        for r in [r for r, rnd in self.rounds.items() if r < oldest and rnd.status != "unmasking"]:
            del self.rounds[r]
        if closed:
            self._write_inboxes(now, current)
        if self._dirty:
            self._write_outcomes(now)
            self._save_state()
        self._book.pins.save()
        return self.figure is not before

    # -- identity and member files --------------------------------------------------------------------
    def _ready(self) -> bool:
        try:
            if self._me is None:
                self._me = identity.load_or_create(self.paths)
            if self._book is None:
                self._book = identity.KeyBook(self.paths, identity.pins_at(self.paths.pins_file), self.problems,
                                              read=self._read_bytes)
        except (identity.IdentityUnavailable, identity.PinsBroken, OSError) as e:
            self.problems.report("identity", f"secure mode: {e}", logging.ERROR)
            return False
        self.problems.clear("identity", "secure mode: identity keys in order again")
        return True

    def _member_keys(self, member: str, *, fresh: bool = False) -> dict[str, bytes] | None:
        """The MAC and sealing keys shared with ``member`` (from its pinned did.json), or None. Its did.json is looked
        at again only when ``fresh`` (enrolment) or never seen: a round's thousands of lookups cost no stat."""
        hit = self._secrets.get(member)
        if hit is not None and not fresh:
            return hit[1]
        keys = self._book.keys_of(member)
        if keys is None:
            return None
        if hit is None or hit[0] != keys.prekey:
            secret = secagg.aggregator_secret(self._me.prekey_private, keys.prekey, member=member,
                                              member_public=keys.prekey, aggregator=self.paths.email,
                                              aggregator_public=self._me.public.prekey)
            derived = {k: secagg.mac_key(secret, k) for k in ("join", "upload", "answers", "inbox")}
            derived["secret"], derived["reveal"] = secret, secagg.reveal_key(secret)
            hit = self._secrets[member] = (keys.prekey, derived)
        return hit[1]

    def _where(self, member: str) -> dict[str, str]:
        """``member``'s secure files as plain strings, built once (a round touches thousands of them)."""
        hit = self._paths.get(member)
        if hit is None:
            p = self.paths
            hit = self._paths[member] = {
                "join": str(p.secure_join_file(member)), "secure": str(p.upload_dir(member)),
                "answers": str(p.answers_file(member)), "inbox_dir": str(p.inbox_dir(member)),
                "inbox": str(p.inbox_file(member)),
            }
        return hit

    def _read_bytes(self, path, st: os.stat_result | None = None) -> bytes | None:
        """A file in a member's datasite (``read_regular``: never blocks, a regular file only, never through a
        symlink in its last component, size capped; ``st``: its ``lstat``, just taken); None when absent or refused
        (said once). Every such file is MAC'd or signed, so one reached through a symlinked folder is refused by its
        MAC, not trusted."""
        try:
            raw = read_regular(path, MAX_MEMBER_FILE_BYTES + 1, st=st)
        except FileNotFoundError:
            return None
        except OSError as e:
            self.problems.report(f"file-{path}", f"secure mode: {path} is refused ({e.strerror or e}): left out")
            return None
        if len(raw) > MAX_MEMBER_FILE_BYTES:
            self.problems.report(f"file-{path}", f"secure mode: {path} is larger than {MAX_MEMBER_FILE_BYTES} bytes: "
                                 "left out")
            return None
        return raw

    def _member_file(self, path: str, model, key: bytes, problem: str, *, keep: bool = True):
        """A member's MAC'd file, parsed with ``model``; None when absent, refused or invalid (said once). Parsed
        again only when its stat signature changes, so a tick costs one ``lstat`` per file that did not. Unless
        ``keep``, a file is returned once per version (None while unchanged) and not held: thousands of parsed files
        kept from round to round made the garbage collector's full pass a tenth of a round at 10,000 members."""
        try:
            st = os.lstat(path)
        except OSError:
            self._files.pop(path, None)
            return None
        sig, hit = signature(st), self._files.get(path)
        if hit is not None and hit[0] == sig:
            return hit[1] if keep else None
        raw, parsed = self._read_bytes(path, st), None
        if raw is not None:
            try:
                parsed = read_mac(raw, model, key)
                self.problems.clear(problem)
            except (Refused, ValidationError) as e:
                why = str(e) if isinstance(e, Refused) else e.errors()[0].get("msg")
                self.problems.report(problem, f"secure mode: {path} is refused and left out ({why})")
        self._files[path] = (sig, parsed if keep else None)
        return parsed

    def _topology(self, epoch: Epoch, h: bytes) -> Topology:
        if h not in self._graphs:
            self._graphs = {k: v for k, v in self._graphs.items() if k in {self.epoch_h, self._old and self._old[1]}}
            self._graphs[h] = Topology.of(epoch)
        return self._graphs[h]

    # -- epochs ---------------------------------------------------------------------------------------
    def _enrolled(self, current: int) -> list[str]:
        """Members that asked to join (a join file MAC'd with the keys of their pinned did.json) and are allowed by
        ``members``: looked up as often as a new epoch may start for them (``epoch_gap``) and before a rollover
        (every tick while there is no epoch)."""
        e = self.epoch
        every = epoch_gap(e) if e is not None else 1
        due = (e is None or self._enrolled_at is None or current + 2 > e.last_round()
               or current >= self._enrolled_at[0] + every)
        if not due:
            return self._enrolled_at[1]
        allowed = set(self.settings.members) if self.settings.members else None
        out = []
        try:
            names = sorted(p.name for p in os.scandir(self.paths.datasites))
        except OSError:
            names = []
        for name in names:
            if not is_datasite_email(name) or (allowed is not None and name not in allowed):
                continue
            where = self._where(name)
            keys = self._member_keys(name, fresh=True) if os.path.lexists(where["join"]) else None
            if keys is None:
                continue
            join = self._member_file(where["join"], SecureJoin, keys["join"], f"join-{name}")
            pinned = self._book.keys_of(name)
            if join is not None and join.email == name and join.identity == b64(pinned.identity):
                out.append(name)
        self._enrolled_at = (current, out)
        return out

    def _epoch_upkeep(self, now: datetime, current: int) -> None:
        """A new epoch when there is none, when the current one ends within two rounds (then members left out for
        being absent get another chance), when a member joins or has been absent from ABSENT_ROUNDS rounds in a row
        (at most once every ``epoch_gap`` rounds: each epoch is a download for every member). It starts two rounds
        ahead, so that members see it first."""
        e = self.epoch
        rollover = e is None or current + 2 > e.last_round()
        if rollover:
            self._excluded = set()
        self._excluded |= {m for m, n in self._absent.items() if n >= ABSENT_ROUNDS}
        wanted = [m for m in self._enrolled(current) if m not in self._excluded]
        if not rollover:
            if wanted == e.cohort and not os.path.lexists(self.paths.epoch_file()):  # withdrawn while exposed
                self._republish_epoch(e)
            if wanted == e.cohort or e.first_round > current:
                return
            if current < self._epoch_began + epoch_gap(e):
                return
        if len(wanted) < self.settings.min_cohort:
            self.problems.report("cohort", f"secure mode: {len(wanted)} members can take part (a join request and "
                                 f"identity document, not absent), fewer than min_cohort {self.settings.min_cohort}: "
                                 "no secure rounds until there are more", logging.INFO)
            return
        self.problems.clear("cohort")
        number = (e.epoch + 1) if e else self._next_number()
        first = current + 2
        try:
            epoch = plan_epoch(number, wanted, self.settings, self.paths.email, first, now)
            raw = signed_file(epoch, self._me.sign)
            epoch, signed = read_signed(raw, Epoch, lambda m, s: identity.verify(self._me.public.identity, m, s))
            atomic_write_bytes(self.paths.aggregator_epoch_copy(number), raw, mode=PRIVATE)
        except (OSError, ValueError) as ex:
            self.problems.report("epoch", f"secure mode: cannot publish epoch {number}: {ex}")
            return
        if not self._publish_epoch(epoch, raw):
            return
        if e is not None:  # the old epoch ends where the new one begins; its rounds in flight finish
            self._old = (e.model_copy(update={"rounds": max(1, first - e.first_round)}), self.epoch_h)
            for rnd in self.rounds.values():
                if rnd.h == self.epoch_h:
                    rnd.epoch = self._old[0]
        self.epoch, self.epoch_h, self._epoch_began = epoch, epoch_hash(signed), current
        self._absent, self._dirty = {}, True
        log.info("secure mode: epoch %d published: %d members, %d neighbours each, threshold %d, at least %d "
                 "survivors, rounds of %g s from %d, %s, epsilon %g per %s (with %d honest members' noise)", number,
                 len(wanted), epoch.degree, epoch.threshold, epoch.min_survivors, epoch.window_s, first,
                 NOISE_WORDS[epoch.noise.family], epoch.epsilon, UNIT_WORDS[epoch.unit], epoch.noise.shares_for)

    def _publish_epoch(self, epoch: Epoch, raw: bytes) -> bool:
        """Write the signed ``raw`` of ``epoch`` where its cohort alone may read it; False (said once) when it cannot
        be written, or when a permission file would let others read it (then the files there are withdrawn, and
        nothing is written)."""
        cohort = sorted(epoch.emails())
        exposed = withhold(guard_for(self.paths.my_datasite, self.paths.sync_state_file), self.paths.epoch_dir(),
                           cohort, [self.paths.epoch_file(), self.paths.rounds_file()])
        if exposed:
            self.problems.report("epoch-exposed", exposure_sentence([exposed], "epoch folders"), logging.ERROR)
            return False
        self.problems.clear("epoch-exposed", "the epoch folder's permission files are safe again")
        try:
            ensure_permissions(self.paths.epoch_dir(), self.paths.email, cohort)  # the cohort alone
            atomic_write_bytes(self.paths.epoch_file(), raw)
        except OSError as ex:
            self.problems.report("epoch", f"secure mode: cannot publish epoch {epoch.epoch}: {ex}")
            return False
        self.problems.clear("epoch")
        return True

    def _republish_epoch(self, epoch: Epoch) -> None:
        """Put back the epoch withdrawn while its folder was exposed (from the private copy of what was signed)."""
        try:
            raw = self.paths.aggregator_epoch_copy(epoch.epoch).read_bytes()
        except OSError as ex:
            self.problems.report("epoch", f"secure mode: cannot read back epoch {epoch.epoch}: {ex}")
            return
        self._publish_epoch(epoch, raw)

    def _next_number(self) -> int:
        """Without a saved state: one more than the epoch on disk, so that members never see a number go back."""
        try:
            return int(json.loads(self.paths.epoch_file().read_bytes())["epoch"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            return 1

    # -- rounds ---------------------------------------------------------------------------------------
    def _read_upload(self, member: str, round_: int) -> SecureUpload | None:
        """A member's upload for a round: read once, at the round's close (no stat cache: a new file each round)."""
        keys = self._member_keys(member)
        path = f"{self._where(member)['secure']}/r{round_}.json"
        raw = None if keys is None else self._read_bytes(path)
        if raw is None:
            return None
        try:
            up = read_mac(raw, SecureUpload, keys["upload"])
        except (Refused, ValidationError) as e:
            why = str(e) if isinstance(e, Refused) else e.errors()[0].get("msg")
            self.problems.report(f"upload-{member}", f"secure mode: {path} is refused and left out ({why})")
            return None
        self.problems.clear(f"upload-{member}")
        return up

    def _close_due(self, now: datetime, current: int) -> list[int]:
        """Close every round whose deadline passed, from the last one closed on (across a restart too): a round whose
        deadline passed while the aggregator was not running fails with that reason. The rounds closed (not failed)."""
        closed = []
        for ep, h in [x for x in (self._old, (self.epoch, self.epoch_h)) if x is not None]:
            start = max(ep.first_round, current - 3 if self._last_closed is None else self._last_closed + 1)
            for r in range(start, min(current, ep.last_round() + 1)):
                if r in self.rounds:
                    continue
                if now.timestamp() < (r + 1) * ep.window_s + ep.deadline_s:
                    break
                rnd = Round(ep, h, r, self._topology(ep, h))
                if r < current - 2:
                    rnd.status, rnd.reason = "failed", "the aggregator was not running at the round's deadline"
                    self.rounds[r] = rnd
                    self._record(rnd, "failed")
                else:
                    self._close(rnd)
                    closed.append(r)
                self._last_closed = r if self._last_closed is None else max(self._last_closed, r)
                self._dirty = True
        return closed

    def _close(self, rnd: Round, survivors: list[str] | None = None) -> None:
        """Fix the round's survivors (the uploads seen, or ``survivors`` when restoring one) and sum their vectors."""
        epoch, r = rnd.epoch, rnd.number
        vectors = []
        h_text = rnd.h_text
        for m in survivors if survivors is not None else epoch.cohort:
            up = self._read_upload(m, r)
            parts = None if up is None else upload_parts(up, epoch, h_text, m, r)
            if isinstance(parts, tuple):
                vectors.append(parts[0])
                rnd.sealed[m] = parts[1]
                rnd.shares[m] = None
                self._absent.pop(m, None)  # the absent only: a zero per member made the saved state 10,000 entries
            else:
                if parts:
                    log.warning("secure round %d: %s's upload does not count: %s", r, m, parts)
                self._absent[m] = self._absent.get(m, 0) + 1
        rnd.survivors = sorted(rnd.shares)
        self.rounds[r] = rnd
        if survivors is not None and len(rnd.survivors) < len(survivors):
            rnd.status, rnd.reason = "failed", "the aggregator restarted and the round's uploads are gone"
            self._record(rnd, "failed")
        elif len(rnd.survivors) < epoch.min_survivors:
            rnd.status = "refused"
            rnd.reason = (f"{len(rnd.survivors)} of {len(epoch.cohort)} members uploaded, fewer than the "
                          f"{epoch.min_survivors} the noise needs: nothing is revealed or published")
            rnd.sealed.clear()
            self._record(rnd, "refused")
        else:
            rnd.total = np.sum(vectors, axis=0, dtype=np.uint64)
            alive = rnd.alive
            rnd.need_keys = {(i, d) for d in rnd.dropped for i in rnd.graph[d] if i in alive}
            self._record(rnd, "unmasking")
            if len(rnd.survivors) < len(epoch.cohort):
                log.info("secure round %d: %d survivors, %d dropped", r, len(rnd.survivors),
                         len(epoch.cohort) - len(rnd.survivors))

    def _collect(self, untold: Sequence[int]) -> None:
        """Views and reveals from the answers files that changed, for the rounds being unmasked but those in
        ``untold`` (closed in this tick: no member has its inbox yet, so no answer to it exists; each answers file
        not looked at now is read at the next tick: a round's 10,000 ``lstat`` saved in steady state)."""
        open_rounds = {r: rnd for r, rnd in self.rounds.items() if rnd.status == "unmasking" and r not in untold}
        if not open_rounds:
            return
        members = set().union(*(rnd.epoch.cohort for rnd in open_rounds.values()))
        h_texts = {r: rnd.h_text for r, rnd in open_rounds.items()}
        for m in sorted(members):
            keys = self._member_keys(m)
            ans = None if keys is None else self._member_file(self._where(m)["answers"], SecureAnswers,
                                                             keys["answers"], f"answers-{m}", keep=False)
            if ans is None or ans.email != m:  # None also while unchanged: each version is taken once
                continue
            for v in ans.views:
                rnd = open_rounds.get(v.round)
                if rnd is not None and v.epoch_hash == h_texts[v.round] and m in rnd.shares and m not in rnd.views:
                    bits, sig = b64_bytes(v.statuses), b64_bytes(v.signature)
                    if len(bits) == (rnd.epoch.degree + 7) // 8:
                        rnd.views[m] = (v.survivors, bits, sig)
                        rnd.packed[m] = secagg.view_record(v.survivors, bits, sig)
            for sr in ans.reveals:
                rnd = open_rounds.get(sr.round)
                if rnd is None or sr.epoch_hash != h_texts[sr.round] or m in rnd.revealed:
                    continue
                try:
                    plain = secagg.unseal(keys["reveal"], b64_bytes(sr.sealed), secagg.reveal_aad(rnd.h, rnd.number))
                    if int.from_bytes(plain[:8], "big") != rnd.number:
                        raise ValueError("a reveal of another round")
                    rnd.take_reveal(m, plain)
                except (InvalidTag, ValueError) as e:
                    log.warning("secure round %d: a reveal of %s does not open (%s): ignored", rnd.number, m,
                                type(e).__name__)
                    rnd.revealed.add(m)

    def _try_unmask(self, rnd: Round, current: int) -> None:
        e = rnd.epoch
        late = current > rnd.number + e.reveal_rounds + 1
        if not rnd.fresh and not late:
            return  # nothing new since the last attempt
        rnd.fresh = False
        shares, lacking = rnd.seed_shares()
        keys_missing = len(rnd.need_keys)
        if lacking or keys_missing:
            if late:
                rnd.status = "failed"
                rnd.reason = (f"not unmasked in time: {lacking} survivors' self masks lack shares, {keys_missing} "
                              "round keys with dropped members are missing")
                log.warning("secure round %d failed: %s", rnd.number, rnd.reason)
                self._finish(rnd, "failed")
            return
        try:
            seeds = secagg.combine_seeds(shares, e.threshold)
            total = secagg.unmask_sum(rnd.total, seeds, [(i, d, k) for (i, d), k in rnd.keys.items()])
        except ValueError as ex:
            rnd.status, rnd.reason = "failed", f"unmasking failed: {ex}"
            self._finish(rnd, "failed")
            return
        bad = implausible(total, e, len(rnd.survivors))
        if bad:
            rnd.status, rnd.reason = "failed", f"the sum is implausible for {len(rnd.survivors)} members, not " \
                                               f"published: {bad} (a member may have added garbage)"
            log.error("secure round %d: %s", rnd.number, rnd.reason)
            self._finish(rnd, "failed")
            return
        rnd.status = "published"
        self._finish(rnd, "published")
        self.figure = secure_figure(e, rnd.number, total, len(rnd.survivors), list(self.recent))

    def _finish(self, rnd: Round, status: str) -> None:
        rnd.total, rnd.sealed, rnd.views, rnd.packed, rnd.bodies, rnd.marks = None, {}, {}, {}, {}, {}
        rnd.inbox_arrays = None
        self._record(rnd, status)

    def _record(self, rnd: Round, status: str) -> None:
        """The round's outcome for the cohort's rounds file and, once final, the public figure's recent rounds (no
        member named in either)."""
        self.outcomes[rnd.number] = RoundOutcome(round=rnd.number, status=status, survivors=len(rnd.survivors),
                                                 reason=rnd.reason)
        for r in sorted(self.outcomes)[:-64]:
            del self.outcomes[r]
        self._dirty = True
        if status == "unmasking":
            return
        self.recent.append(SecureRoundStatus(round=rnd.number, round_end=_utc(rnd.epoch.window(rnd.number)[1]),
                                             status=status, survivors=len(rnd.survivors), reason=rnd.reason))
        if status != "published" and self.figure is not None:
            self.figure = self.figure.model_copy(update={"recent": list(self.recent)})

    # -- inboxes and the rounds file ------------------------------------------------------------------
    def _write_inboxes(self, now: datetime, current: int) -> None:
        """Each cohort member's inbox, MAC'd for it. Permission files are written once per member and process; no
        fsync (an inbox is rewritten at the next close anyway). A folder whose permission files would let anyone
        else read it gets nothing: its inbox is withdrawn (said once) and written again once that is fixed."""
        guard, exposed, failed = guard_for(self.paths.my_datasite, self.paths.sync_state_file), [], []
        for m, body in self.inbox_bodies(now, current).items():
            where = self._where(m)  # plain strings: a Path per member per round was the round's largest cost
            why = withhold(guard, where["inbox_dir"], [m], [where["inbox"]])
            if why:
                exposed.append(why)
                self._perms_done.discard(m)
                continue
            try:
                if m not in self._perms_done:
                    ensure_permissions(self.paths.inbox_dir(m), self.paths.email, [m])
                    self._perms_done.add(m)
                replace_file(where["inbox"], body)
            except OSError as ex:
                self._perms_done.discard(m)
                if ex.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # no inbox can be written: stop here
                    self.problems.report("inbox-write", f"secure mode: cannot write inboxes ({ex}); free disk space")
                    return
                failed.append(f"{where['inbox']} ({ex.strerror or ex})")  # this member's alone: the others go on
        if failed:
            self.problems.report("inbox-write", f"secure mode: cannot write {len(failed)} inbox(es), those members "
                                 f"cannot answer until it is fixed: {', '.join(failed[:3])}"
                                 f"{' ...' if len(failed) > 3 else ''}; remove what is in the way")
        else:
            self.problems.clear("inbox-write", "secure mode: every inbox written again")
        if exposed:
            self.problems.report("inbox-exposed", exposure_sentence(exposed, "inbox folders"), logging.ERROR)
        else:
            self.problems.clear("inbox-exposed", "the inbox folders' permission files are safe again")

    def inbox_bodies(self, now: datetime, current: int) -> dict[str, bytes]:
        """Each cohort member's inbox: the newest rounds it still has to answer (at most INBOX_ROUNDS), MAC'd."""
        recent = [self.rounds[r] for r in sorted(self.rounds, reverse=True)
                  if (self.rounds[r].status == "unmasking" or (self.rounds[r].status == "refused"
                                                               and r >= current - 2))]
        for rnd in recent:
            rnd.inbox_arrays = None  # gathered again: views arrived since the last pass
        members = set(self.epoch.cohort) | (set(self._old[0].cohort) if self._old else set())
        out = {}
        for m in sorted(members):
            keys = self._member_keys(m)
            if keys is None:
                continue
            entries = []
            for rnd in recent:
                if m not in rnd.graph or m in rnd.revealed:
                    continue
                if rnd.status == "refused":
                    entries.append(inbox_round(round=rnd.number, epoch_hash=rnd.h_text, status="refused",
                                               survivors=len(rnd.survivors), reason=rnd.reason))
                else:
                    entries.append(self._inbox_entry(rnd, m))
                if len(entries) == INBOX_ROUNDS:
                    break
            out[m] = inbox_file(m, now, entries, keys["inbox"])
        return out

    @staticmethod
    def _inbox_entry(rnd: Round, m: str) -> bytes:
        """What ``m`` is told of one round (an ``InboxRound``, encoded by ``inbox_round``): statuses over its
        neighbours, the survivor count, the shares its surviving neighbours sealed for it (until its view shows it has
        them) and the signed views of those that sent one, all gathered for the whole cohort once per pass
        (``Topology.gather``, ``spread``)."""
        topo = rnd.topo
        if rnd.inbox_arrays is None:
            sealed_rows, senders = topo.gather(rnd.sealed, rnd.epoch.cohort, secagg.SEALED_SHARE_BYTES)
            view_rows, signers = topo.spread(rnd.packed, rnd.epoch.cohort, secagg.view_size(topo.degree))
            signed = signers & senders
            rnd.inbox_arrays = (sealed_rows, senders, view_rows, signed, senders.all(axis=1).tolist(),
                                signed.all(axis=1).tolist(), signed.any(axis=1).tolist(), rnd.h_text)
        sealed_rows, senders, view_rows, signed, everyone, all_signed, any_signed, h_text = rnd.inbox_arrays
        i = topo.index[m]
        if everyone[i]:
            bits, sealed = topo.all_bits, b"" if m in rnd.views else sealed_rows[i].tobytes()
        else:
            alive = senders[i]
            bits, sealed = secagg.pack_bits(alive), b"" if m in rnd.views else sealed_rows[i][alive].tobytes()
        if all_signed[i]:  # secagg.pack_views with every neighbour's view present, in one copy
            views = topo.all_bits + view_rows[i].tobytes()
        elif any_signed[i]:
            views = secagg.pack_views(signed[i], view_rows[i])
        else:
            views = b""
        return inbox_round(round=rnd.number, epoch_hash=h_text, status="unmasking", survived=m in rnd.shares,
                           survivors=len(rnd.shares), statuses=bits, sealed=sealed, views=views)

    def _write_outcomes(self, now: datetime) -> None:
        """The recent rounds' outcomes, signed, for the cohort (beside the epoch, under its permission)."""
        body = RoundOutcomes(aggregator=self.paths.email, epoch=self.epoch.epoch, epoch_hash=b64(self.epoch_h),
                             created_at=now, rounds=[self.outcomes[r] for r in sorted(self.outcomes)])
        if withhold(guard_for(self.paths.my_datasite, self.paths.sync_state_file), self.paths.epoch_dir(),
                    sorted(self.epoch.emails()), [self.paths.epoch_file(), self.paths.rounds_file()]):
            return  # said by the epoch folder's check (the aggregator's, at every tick)
        try:
            atomic_write_chunks(self.paths.rounds_file(), [signed_file(body, self._me.sign)], durable=False,
                                fsync=False)
            self.problems.clear("rounds-write")
        except OSError as ex:
            self.problems.report("rounds-write", f"secure mode: cannot write {self.paths.rounds_file()}: {ex}")

    # -- state across restarts ------------------------------------------------------------------------
    def _save_state(self) -> None:
        """The epoch(s) in use and every round not yet final (its dropped members: the survivors told to members),
        the last round closed and the recent outcomes: durable, private."""
        rounds = {r: {"hash": b64(rnd.h), "status": rnd.status, "dropped": rnd.dropped, "reason": rnd.reason}
                  for r, rnd in self.rounds.items() if rnd.status in ("unmasking", "refused")}
        doc = {"epoch": self.epoch.epoch, "hash": b64(self.epoch_h),
               "old": [self._old[0].epoch, b64(self._old[1]), self._old[0].rounds] if self._old else None,
               "began": self._epoch_began, "last_closed": self._last_closed, "rounds": rounds,
               "outcomes": [o.model_dump(mode="json") for o in self.outcomes.values()],
               "recent": [s.model_dump(mode="json") for s in self.recent], "absent": self._absent}
        try:
            atomic_write_json(self.paths.aggregator_secure_file, doc, indent=None, mode=PRIVATE)
            self._dirty = False
            self.problems.clear("secure-state")
        except OSError as ex:
            self.problems.report("secure-state", f"secure mode: cannot save {self.paths.aggregator_secure_file} "
                                 f"({ex}): a restart would lose the open rounds")

    def _load_epoch(self, number: int, h: str) -> Epoch | None:
        try:
            raw = self.paths.aggregator_epoch_copy(number).read_bytes()
            epoch, signed = read_signed(raw, Epoch, lambda m, s: identity.verify(self._me.public.identity, m, s))
        except (OSError, Refused, ValidationError):
            return None
        return epoch if b64(epoch_hash(signed)) == h else None

    def _restore(self) -> None:
        """Resume the saved epoch and rounds: rounds being unmasked continue (their uploads read again, their answers
        collected again), the others keep their outcome."""
        self._restored = True
        try:
            doc = json.loads(self.paths.aggregator_secure_file.read_text("utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as ex:
            log.error("secure mode: %s is unreadable (%s): starting afresh", self.paths.aggregator_secure_file, ex)
            return
        try:
            epoch = self._load_epoch(doc["epoch"], doc["hash"])
            if epoch is None:
                log.warning("secure mode: the saved epoch %s cannot be read back: starting a new one", doc["epoch"])
                return
            self.epoch, self.epoch_h, self._epoch_began = epoch, b64_bytes(doc["hash"]), int(doc["began"])
            if doc["old"]:
                old = self._load_epoch(doc["old"][0], doc["old"][1])
                if old is not None:
                    self._old = (old.model_copy(update={"rounds": doc["old"][2]}), b64_bytes(doc["old"][1]))
            self._last_closed = doc["last_closed"]
            self._absent = {str(k): int(v) for k, v in doc["absent"].items()}
            self.outcomes = {o["round"]: RoundOutcome.model_validate(o) for o in doc["outcomes"]}
            self.recent.extend(SecureRoundStatus.model_validate(s) for s in doc["recent"])
            by_hash = {b64(h): ep for ep, h in [x for x in (self._old, (self.epoch, self.epoch_h)) if x]}
            for r, saved in sorted(doc["rounds"].items(), key=lambda kv: int(kv[0])):
                ep = by_hash.get(saved["hash"])
                if ep is None:
                    continue
                rnd = Round(ep, b64_bytes(saved["hash"]), int(r), self._topology(ep, b64_bytes(saved["hash"])))
                if saved["status"] == "refused":
                    rnd.status, rnd.reason = "refused", saved["reason"]
                    self.rounds[rnd.number] = rnd
                    continue
                gone = set(saved["dropped"])
                self._close(rnd, [m for m in ep.cohort if m not in gone])
        except (AttributeError, KeyError, TypeError, ValueError, ValidationError) as ex:  # any shape of JSON
            log.error("secure mode: %s does not hold a usable state (%s): starting afresh",
                      self.paths.aggregator_secure_file, ex)
            self.epoch = self.epoch_h = self._old = None
            self.rounds, self.outcomes = {}, {}
            return
        log.info("secure mode: resumed epoch %d after a restart (%d rounds being unmasked)", self.epoch.epoch,
                 sum(1 for rnd in self.rounds.values() if rnd.status == "unmasking"))
