"""The member's side of secure aggregation (protocol version 2): its identity, the epoch check against its own
minimums, its round uploads, its signed views and its reveals, each recorded durably before it leaves.

Round r is [r * w, (r + 1) * w) in UTC seconds, w = ``release_seconds(secure_unit, interval_s)`` (the measurement
window itself, or several of them for ``cpu_day``: the member measures every window and a round releases their mean).

1. Upload, at the round's end: the epoch checked (signed by the pinned aggregator key, its content pinned per epoch
   number, every parameter against this member's own minimums: ``epoch_problem``), the ledger charged, the round
   marked used (durably: a round number is never used again, whatever the epoch), then the masked vector and the
   self-mask seed's shares sealed for each neighbour.
2. View: once the inbox says round r closed with this member among the survivors, it signs one view of r (its
   neighbours' statuses and the survivor count), at most one per round, recorded before it leaves.
3. Reveal: once the inbox carries its neighbours' signed views of r and at least t of them verify under their
   pinned keys and agree with its own (``secagg.consistent_signers``), it reveals per its own view: a share of each
   neighbour's seed it saw survive, the round key with each it saw drop, never both for one (round, peer), only for
   a round it uploaded in and at most ``REVEAL_HORIZON`` rounds back. Recorded first, sealed for the aggregator.
Views and reveals go into ``answers.json`` as soon as the inbox changes (``answer``, polled every second by
``answer_loop``), so a figure needs no extra round for them. The window's raw mean never leaves this process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Callable

from cryptography.exceptions import InvalidTag
from pydantic import ValidationError

from shared import __version__
from shared.secure import identity, secagg
from shared.atomic import PRIVATE, atomic_write_bytes, atomic_write_json, read_capped
from shared.privacy.ledger import BudgetExceeded, Charge, LedgerKeeper, Spend
from shared.privacy.safezone import day_epsilon as monitors_day_epsilon
from shared.logs import Problems
from shared.paths import Paths
from shared.permissions import undelivered_causes
from shared.privacy import CPU_BOUNDS, DAY_UNIT, clip_cpu
from shared.wire.schema import utc_now
from shared.secure.secnoise import NoiseSpec, epsilon_of, quantize, release_event, sample_share
from shared.wire.secure_schema import (
    DAY_S,
    UNIT_WORDS,
    Epoch,
    Inbox,
    InboxRound,
    Refused,
    SealedReveal,
    SecureAnswers,
    SecureJoin,
    SecureUpload,
    SignedView,
    b64,
    b64_bytes,
    epoch_hash,
    mac_file,
    mean_sensitivity_for,
    read_mac,
    read_signed,
    release_seconds,
    releases_for,
)
from shared.settings import Settings

log = logging.getLogger("cpu_tracker.member")
KEEP_UPLOADS = 4  # round files kept: the aggregator reads round r's at its deadline
REVEAL_HORIZON = 10  # rounds back a member still answers (views and reveals); records older than that are dropped
KEEP_EPOCH_PINS = 64
MAX_EPOCH_BYTES = 1 << 24  # the cohort's emails: about 300 KB at 10,000 members
POLL_S = 1.0  # how often answer_loop looks at the inbox (a stat; parsed only when it changed)
PAUSE_AFTER = 3  # rounds uploaded, past their deadline, that no inbox shows closed: stop charging until one does


def round_of(start: datetime, end: datetime, round_s: float) -> int:
    """The round a measurement window [start, end) falls in: the one that holds its middle."""
    return math.floor((start.timestamp() + end.timestamp()) / 2 / round_s)


def bin_of(mean: float, bins: int) -> int:
    lo, hi = CPU_BOUNDS
    return min(bins - 1, max(0, math.floor((mean - lo) / (hi - lo) * bins)))


def window_vector(raw_mean: float, epoch: Epoch, rng=None) -> list[int]:
    """The member's vector for one round, before masking: its quantized mean, the one-hot histogram of that mean
    over ``epoch.bins`` bins, plus its noise share. Only this member ever sees it."""
    mean = clip_cpu(raw_mean)
    x = [quantize(mean, epoch.scale, rng)] + [0] * epoch.bins
    x[1 + bin_of(mean, epoch.bins)] = 1
    noise = sample_share(epoch.noise, epoch.bins, rng)
    return [a + b for a, b in zip(x, noise)]


def epoch_epsilon(epoch: Epoch) -> float:
    """The epsilon, for the epoch's unit, of its releases when the sum holds only ``lying_floor`` honest members'
    noise shares (the fewest an aggregator that lies about dropouts can unmask a sum over), computed by this member
    from the cohort and degree and by dp-accounting: a whole UTC day of rounds for ``cpu_day``. ValueError when the
    noise is not complete with that many shares."""
    floor = secagg.lying_floor(len(epoch.cohort), epoch.degree)
    event = release_event(epoch.noise, floor)
    return epsilon_of([event] * releases_for(epoch.unit, epoch.window_s), epoch.delta)


def epoch_problem(epoch: Epoch, me: str, settings: Settings) -> str | None:
    """Why this member must not take part in ``epoch`` (None: it may): every parameter that protects it, checked
    against its own settings. The signature and the content pin are checked before (``SecureMember.epoch_for``)."""
    n, e = len(epoch.cohort), epoch.epoch
    if epoch.aggregator != settings.aggregator:
        return f"epoch {e} is not from the aggregator ({epoch.aggregator}, this member trusts {settings.aggregator})"
    if me not in epoch.cohort:
        return f"this datasite is not in epoch {e} yet (it is enrolled at the next epoch)"
    if n < settings.min_cohort:
        return f"epoch {e} has {n} members; this member needs at least {settings.min_cohort} (min_cohort)"
    if epoch.degree < secagg.graph_degree(n):
        return (f"epoch {e} gives each member {epoch.degree} neighbours; this member's rule asks for "
                f"{secagg.graph_degree(n)} in a cohort of {n}")
    if not secagg.shamir_threshold(epoch.degree) <= epoch.threshold <= epoch.degree:
        return f"epoch {e}'s threshold {epoch.threshold} is not more than half of {epoch.degree} neighbours"
    survivors = max(settings.min_cohort, math.ceil(settings.min_survivor_fraction * n - 1e-9))
    if epoch.min_survivors < min(n, survivors):
        return (f"epoch {e} needs {epoch.min_survivors} survivors a round; this member needs at least "
                f"{min(n, survivors)} (min_cohort, min_survivor_fraction)")
    if epoch.unit != settings.secure_unit:  # an epsilon per day says little about one window, and vice versa
        return (f"epoch {e} protects {UNIT_WORDS[epoch.unit]}, this member asks for "
                f"{UNIT_WORDS[settings.secure_unit]} (secure_unit)")
    round_s = release_seconds(settings.secure_unit, settings.interval_s)
    if abs(epoch.window_s - round_s) > 1e-9:
        return f"epoch {e} uses {epoch.window_s:g} s rounds, this member {round_s:g} s (interval_s, secure_unit)"
    if epoch.units_per_window != settings.samples_per_window:
        return f"epoch {e} counts {epoch.units_per_window} seconds a window, this member {settings.samples_per_window}"
    needed = mean_sensitivity_for(epoch.unit, epoch.scale, epoch.units_per_window)
    if epoch.noise.mean_sensitivity < needed:
        return (f"epoch {e}'s noise is calibrated for a sensitivity of {epoch.noise.mean_sensitivity}, less than the "
                f"{needed} its unit needs")
    floor = secagg.lying_floor(n, epoch.degree)
    if epoch.noise.shares_for > floor:
        return (f"epoch {e}'s noise is complete only with {epoch.noise.shares_for} members' shares; an aggregator that "
                f"lies about dropouts can unmask a sum of {floor}")
    if epoch.delta > settings.secure_delta:
        return f"epoch {e}'s delta {epoch.delta:g} exceeds this member's secure_delta {settings.secure_delta:g}"
    try:
        eps = epoch_epsilon(epoch)
    except ValueError as ex:
        return f"epoch {e}'s noise cannot be accounted: {ex}"
    if eps > settings.secure_target * (1 + 1e-6):
        return (f"epoch {e}'s noise gives epsilon {eps:.4g} per unit with {floor} honest members' shares, more than "
                f"this member's secure_epsilon {settings.secure_target:g}")
    if epoch.reveal_rounds > REVEAL_HORIZON - 2:
        return f"epoch {e} keeps rounds open {epoch.reveal_rounds} rounds; this member answers {REVEAL_HORIZON - 2}"
    if not 0 < epoch.deadline_s < epoch.window_s:
        return f"epoch {e}'s deadline {epoch.deadline_s:g} s is not within its {epoch.window_s:g} s rounds"
    return None


def release_epsilon(epoch: Epoch) -> float:
    """One round's epsilon for its unit at the lying floor (the ledger's rolling budgets add these)."""
    return epsilon_of([release_event(epoch.noise, secagg.lying_floor(len(epoch.cohort), epoch.degree))], epoch.delta)


@lru_cache(maxsize=8)
def _spec(noise_json: str) -> NoiseSpec:
    """A ledger line's NoiseSpec: the day's releases share a few, parsed once each."""
    return NoiseSpec.model_validate_json(noise_json)


class DayBudgetExceeded(BudgetExceeded):
    def __init__(self, day: str, spent: float, cap: float):
        RuntimeError.__init__(self, f"secure release skipped: with it, epsilon {spent:.4g} (dp-accounting, delta "
                              f"from secure_delta) would be spent on the UTC day {day}, over secure_epsilon {cap:g}")
        self.spent = spent


def day_check(cap: float, delta: float) -> Callable:
    """The ledger's further check for the ``cpu_day`` unit: the day's secure releases, composed by dp-accounting,
    and the private alerts' spends on that day (added: ``shared.privacy.safezone.day_epsilon``) stay within ``cap`` on
    every UTC day the new spend's window touches."""

    def check(recorded, new: Spend) -> None:
        day = new.window_start.replace(hour=0, minute=0, second=0, microsecond=0)
        while day < new.window_end:
            end = day + timedelta(days=1)
            same = Counter((s.noise, s.survivors) for s in (*recorded, new) if s.unit == DAY_UNIT
                           and s.noise is not None and s.window_start < end and s.window_end > day)
            events = [ev for (noise, survivors), n in same.items()
                      for ev in [release_event(_spec(noise), survivors)] * n]
            spent = epsilon_of(events, delta) + monitors_day_epsilon((*recorded, new), day, end)  # + private alerts
            if spent > cap * (1 + 1e-9):
                raise DayBudgetExceeded(day.date().isoformat(), spent, cap)
            day = end

    return check


class StateBroken(RuntimeError):
    pass


@dataclass
class MemberState:
    """What this member must never forget, on disk (0600, fsynced before anything it protects leaves):
    ``last_used``, the highest round it uploaded in (it never uploads at or below it again: a clock stepped back
    cannot reuse a round); ``used``: round -> the epoch hash it uploaded under (it signs and reveals only for those,
    under that hash: a round asked again under another epoch gets nothing); ``views``: round -> the one view it
    signed; ``answered``: round -> peer -> "share" or "key"; ``epochs``: epoch number -> hash (a different content
    under a number already seen is refused). Rounds older than ``last_used - REVEAL_HORIZON`` are never answered,
    so their records are dropped."""

    path: object
    last_used: int = -1
    used: dict[int, str] = field(default_factory=dict)
    views: dict[int, dict] = field(default_factory=dict)
    answered: dict[int, dict[str, str]] = field(default_factory=dict)
    epochs: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path) -> "MemberState":
        try:
            doc = json.loads(path.read_text("utf-8"))
            return cls(path, int(doc["last_used"]), {int(k): v for k, v in doc["used"].items()},
                       {int(k): v for k, v in doc["views"].items()},
                       {int(k): v for k, v in doc["answered"].items()}, {int(k): v for k, v in doc["epochs"].items()})
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # refuse to guess: both halves
            raise StateBroken(f"{path} is unreadable ({e}): secure rounds pause until it is restored (removing it "
                              "is safe only together with the identity keys: new keys start afresh)") from e

    def in_window(self, round_: int) -> bool:
        return round_ >= self.last_used - REVEAL_HORIZON

    def save(self) -> None:
        floor = self.last_used - REVEAL_HORIZON
        for book in (self.used, self.views, self.answered):
            for r in [r for r in book if r < floor]:
                del book[r]
        for e in sorted(self.epochs)[:-KEEP_EPOCH_PINS]:
            del self.epochs[e]
        atomic_write_json(self.path, {"last_used": self.last_used, "used": self.used, "views": self.views,
                                      "answered": self.answered, "epochs": self.epochs}, indent=None, mode=PRIVATE)


@dataclass
class SecureMember:
    """Takes part in the aggregator's secure rounds. All file I/O of the member's secure mode lives here; ``publish``
    (the member loop, once per window) and ``answer`` (the inbox poller) take turns under one lock."""

    paths: Paths
    settings: Settings
    problems: Problems
    keeper: LedgerKeeper  # the member's ledger, and the one way every spender charges it
    delivered: Callable[[Path], bool | None] = lambda path: None  # the relay holds this upload? (None: unknown)
    _me: identity.Identity | None = None
    _book: identity.KeyBook | None = None
    _agg: identity.PublicKeys | None = None
    _keys: dict[str, bytes] = field(default_factory=dict)  # purpose -> key, from the member-aggregator secret
    _state: MemberState | None = None
    _epochs: dict[int, tuple[Epoch, bytes]] = field(default_factory=dict)
    _epoch_seen: tuple[tuple[int, int, int] | None, str | None] | None = None
    _pairs: dict[tuple[str, bytes], bytes] = field(default_factory=dict)
    _round: tuple[int, float, float, float] | None = None  # (round, first start, seconds, seconds x mean)
    _inbox_seen: tuple[int, int, int] | None = None
    _closed_seen: int | None = None  # the newest round any inbox showed closed
    _said: dict[int, str] = field(default_factory=dict)  # round -> why nothing was revealed (said once)
    _answers: SecureAnswers | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # -- identity, pins, the aggregator's keys, the join request ----------------------------------------
    def ready(self) -> bool:
        """Keys, pins, state and the aggregator's pinned keys in hand, and the join request written (each problem
        said once)."""
        try:
            if self._me is None:
                self._me = identity.load_or_create(self.paths)
            if self._book is None:
                self._book = identity.KeyBook(self.paths, identity.pins_at(self.paths.pins_file), self.problems)
            if self._state is None:
                self._state = MemberState.load(self.paths.secure_state_file)
        except (identity.IdentityUnavailable, identity.PinsBroken, StateBroken, OSError) as e:
            self.problems.report("identity", f"secure mode: {e}", logging.ERROR)
            return False
        self.problems.clear("identity", "secure mode: identity keys and records in order again")
        agg = self._book.keys_of(self.settings.aggregator)
        if agg is None:
            return False
        try:
            self._book.pins.save()
            if agg != self._agg:
                secret = secagg.aggregator_secret(self._me.prekey_private, agg.prekey, member=self.paths.email,
                                                  member_public=self._me.public.prekey,
                                                  aggregator=agg.email, aggregator_public=agg.prekey)
                self._keys = {k: secagg.mac_key(secret, k) for k in ("join", "upload", "answers", "inbox")}
                self._keys["secret"], self._keys["reveal"] = secret, secagg.reveal_key(secret)
                self._agg, self._answers = agg, None
            self._ensure_join()
        except (OSError, ValueError) as e:
            self.problems.report("join", f"secure mode: cannot ask to join the aggregator's rounds: {e}")
            return False
        self.problems.clear("join")
        return True

    def _ensure_join(self) -> None:
        path = self.paths.secure_join_file()
        raw = read_capped(path)
        try:
            current = read_mac(raw or b"", SecureJoin, self._keys["join"])
            if current.identity == b64(self._me.public.identity) and current.email == self.paths.email:
                return
        except (Refused, ValidationError):
            pass
        join = SecureJoin(email=self.paths.email, identity=b64(self._me.public.identity), created_at=utc_now(),
                          app_version=__version__)
        atomic_write_bytes(path, mac_file(join, self._keys["join"]))

    # -- epoch ----------------------------------------------------------------------------------------
    def epoch_for(self, round_: int) -> tuple[Epoch, bytes] | None:
        """The epoch (and its hash) that covers ``round_`` and that this member accepts (logged once when none)."""
        path = self.paths.epoch_file(self.settings.aggregator)
        try:  # parsed again only when it changed
            st = os.stat(path)
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            sig = None
        if sig is None:
            problem = f"no epoch from {self.settings.aggregator} yet ({path} not synced): waiting"
        elif self._epoch_seen is not None and self._epoch_seen[0] == sig:
            problem = self._epoch_seen[1]
        else:
            problem = self._read_epoch(path)
            self._epoch_seen = (sig, problem)
        chosen = next((x for _, x in sorted(self._epochs.items(), reverse=True)
                       if x[0].first_round <= round_ <= x[0].last_round()), None)
        if chosen is not None and problem is None:
            problem = epoch_problem(chosen[0], self.paths.email, self.settings)
        elif chosen is None and problem is None:
            problem = f"no epoch covers round {round_} yet: waiting for the aggregator's next one"
        if problem:
            self.problems.report("epoch", f"secure mode: {problem}", logging.WARNING)
            return None
        e = chosen[0]
        self.problems.clear("epoch", f"secure mode: taking part in epoch {e.epoch} ({len(e.cohort)} members, "
                            f"{UNIT_WORDS[e.unit]} at epsilon {e.epsilon:g}; aggregator identity key "
                            f"{self._agg.fingerprint}, this datasite's {self._me.public.fingerprint})")
        return chosen

    def _read_epoch(self, path) -> str | None:
        """Verify and parse the epoch file into ``_epochs``; why it is refused, or None."""
        raw = read_capped(path, MAX_EPOCH_BYTES) or b""
        try:
            epoch, signed = read_signed(raw, Epoch, lambda m, s: identity.verify(self._agg.identity, m, s))
        except Refused as e:
            return (f"the epoch file {path} is refused ({e}): not written by the aggregator, or altered; this member "
                    "publishes nothing until a signed one arrives")
        except ValidationError as e:
            return (f"the epoch file {path} is not valid and is refused ({_first_error(e)}); this member publishes "
                    "nothing until the aggregator fixes it")
        h = epoch_hash(signed)
        pinned = self._state.epochs.get(epoch.epoch)
        if pinned is not None and pinned != b64(h):
            return (f"epoch {epoch.epoch} changed its content after this member read it (an aggregator showing "
                    "different epochs to different members, or a replay): refused, equivocation seen")
        if epoch.epoch < max(self._state.epochs, default=0) - KEEP_EPOCH_PINS:
            return f"epoch {epoch.epoch} is older than the epochs this member has seen: refused"
        if pinned is None:
            self._state.epochs[epoch.epoch] = b64(h)
            self._state.save()
        self._epochs[epoch.epoch] = (epoch, h)
        for old in sorted(self._epochs)[:-2]:
            del self._epochs[old]
        return None

    def _epoch_with(self, h: bytes) -> Epoch | None:
        return next((e for e, eh in self._epochs.values() if eh == h), None)

    def pair(self, peer: str) -> bytes | None:
        """The pair secret with ``peer`` from its pinned keys (None, said once, while its did.json is unknown)."""
        keys = self._book.keys_of(peer)
        if keys is None:
            return None
        k = (peer, keys.prekey)
        if k not in self._pairs:
            self._pairs[k] = secagg.pair_secret(self._me.prekey_private, self._me.public.prekey, keys.prekey,
                                                me=self.paths.email, peer=peer, aggregator=self.settings.aggregator)
        return self._pairs[k]

    # -- the round ------------------------------------------------------------------------------------
    def publish(self, raw_mean: float, start: datetime, end: datetime) -> bool:
        """Add one measurement window [start, end) to its round; at the round's end, take part in it with the mean
        of the round's windows. True if an upload was written."""
        round_s = release_seconds(self.settings.secure_unit, self.settings.interval_s)
        r = round_of(start, end, round_s)
        seconds = (end - start).total_seconds()
        value = clip_cpu(raw_mean)
        if self._round is None or self._round[0] != r:
            self._round = (r, start.timestamp(), 0.0, 0.0)
        _, first, covered, total = self._round
        covered, total = covered + seconds, total + seconds * value
        self._round = (r, first, covered, total)
        if end.timestamp() < (r + 1) * round_s - 1:
            return False  # the round goes on
        self._round = None
        if first > r * round_s + 1:  # a partial round: its sensitivity is larger
            log.info("secure mode: round %d began late (%s): waiting for the next whole round", r,
                     datetime.fromtimestamp(first, timezone.utc).isoformat(timespec="seconds"))
            return False
        with self._lock:
            if not self.ready():
                return False
            self.answer()  # the inbox first: it says which rounds the aggregator closed
            uploaded = self._take_part(r, total / covered if covered > 0 else value, end)
        self.answer()
        return uploaded

    def _take_part(self, r: int, mean: float, end: datetime) -> bool:
        chosen = self.epoch_for(r)
        if chosen is None:
            return False
        epoch, h = chosen
        state = self._state
        if r <= state.last_used:
            self.problems.report("clock", f"secure mode: round {r} is at or below round {state.last_used}, the last "
                                 "this member used (the clock went back?): it is never used twice; waiting")
            return False
        self.problems.clear("clock")
        unclosed = sorted(u for u in state.used if u <= r - 2 and (self._closed_seen is None or u > self._closed_seen))
        if len(unclosed) >= PAUSE_AFTER:  # nothing charged for nothing: the aggregator or the relay is away
            self.problems.report("unclosed", f"secure mode: the aggregator has closed none of rounds "
                                 f"{unclosed[0]}-{unclosed[-1]} this member uploaded in (it or the relay is down?): "
                                 "not taking part, so nothing is charged, until its inbox shows a round closed")
            return False
        self.problems.clear("unclosed", "secure mode: the aggregator closes rounds again: taking part")
        if state.last_used >= 0 and self.delivered(self.paths.upload_file(state.last_used)) is False:
            self.problems.report("undelivered", f"secure mode: the upload for round {state.last_used} has not reached "
                                 f"the relay yet ({undelivered_causes(self.paths.sync_state_file)}): not taking part, "
                                 "so nothing is charged, until it has")
            return False
        self.problems.clear("undelivered", "secure mode: the relay has the last upload: taking part")
        peers = epoch.neighbours(self.paths.email)
        pairs = {p: self.pair(p) for p in peers}
        missing = [p for p, k in pairs.items() if k is None]
        if missing:
            self.problems.report("peers", f"secure mode: no identity document yet from {len(missing)} neighbour(s) "
                                 f"(e.g. {missing[0]}): round {r} skipped until they sync")
            return False
        self.problems.clear("peers")
        self._book.pins.save()
        if self.keeper.ledger() is None:
            return False
        round_start = datetime.fromtimestamp(epoch.window(r)[0], timezone.utc)
        spend = Spend(
            released_at=utc_now(), window_start=round_start, window_end=end, epsilon=release_epsilon(epoch),
            delta=epoch.delta, mechanism=f"secure-{epoch.noise.family}", unit=epoch.unit,
            n_samples=epoch.units_per_window, noise=epoch.noise.model_dump_json(),
            survivors=secagg.lying_floor(len(epoch.cohort), epoch.degree),
        )
        also = day_check(self.settings.secure_target, epoch.delta) if epoch.unit == DAY_UNIT else None
        charged = self.keeper.charge(spend, who="secure mode: ", resume="rounds resume by themselves once the span "
                                     "rolls past", also=also, needs_s=DAY_S if also is not None else 0.0)
        if charged is not Charge.CHARGED:
            return False
        try:
            state.last_used = r
            state.used[r] = b64(h)
            state.save()  # before anything of round r leaves: the round is never used again
        except OSError as e:
            self.problems.report("state-write", f"secure mode: cannot record round {r} ({e}): not taking part")
            return False
        upload = self._upload(epoch, h, r, mean, pairs).model_copy(update={"unit": epoch.unit,
                                                                           "epsilon": spend.epsilon})
        return self._write(r, mac_file(upload, self._keys["upload"]))

    def _upload(self, epoch: Epoch, h: bytes, r: int, mean: float, pairs: dict[str, bytes]) -> SecureUpload:
        me = self.paths.email
        peers = list(pairs)
        values = window_vector(mean, epoch)
        seed = secagg.new_seed()
        keys = {p: secagg.round_key(pairs[p], h, r) for p in peers}
        y = secagg.masked(values, self_seed=seed, round_keys=keys, me=me)
        shares = secagg.split_seed(seed, len(peers), epoch.threshold)
        sealed = b"".join(secagg.seal_share(secagg.share_key(pairs[p], h, r, me, p), s) for p, s in zip(peers, shares))
        return SecureUpload(app_version=__version__, email=me, epoch=epoch.epoch, epoch_hash=b64(h), round=r,
                            created_at=utc_now(), vector=secagg.encode_vector(y), sealed=b64(sealed))

    def _write(self, r: int, body: bytes) -> bool:
        folder = self.paths.upload_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.paths.upload_file(r), body)
            for old in folder.glob("r*.json"):
                round_ = self.paths.upload_round(old.name)
                if round_ is not None and round_ <= r - KEEP_UPLOADS:
                    old.unlink(missing_ok=True)
        except OSError as e:
            self.problems.report("upload-write", f"cannot write the secure round file in {folder}: {e}. Free disk "
                                 "space.")
            return False
        self.problems.clear("upload-write", "secure round files written again")
        return True

    # -- views and reveals ----------------------------------------------------------------------------
    def answer_loop(self, stop: threading.Event) -> None:
        """Answer the inbox as soon as it changes (a stat every ``POLL_S`` seconds) until ``stop`` is set."""
        while not stop.wait(POLL_S):
            try:
                self.answer()
            except Exception as e:  # noqa: BLE001 - the member loop goes on; the problem is said once
                self.problems.report("answer", f"secure mode: answering the inbox failed: {type(e).__name__}: {e}",
                                     logging.ERROR)

    def answer(self) -> None:
        """Read the inbox if it changed; sign views and reveal what it now allows; write the answers."""
        with self._lock:
            if self._me is None or self._agg is None or self._state is None:
                return
            path = self.paths.inbox_file(self.paths.email, self.settings.aggregator)
            try:
                st = os.stat(path)
                sig = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                return
            if sig == self._inbox_seen:
                return
            self._inbox_seen = sig
            try:
                inbox = read_mac(read_capped(path) or b"", Inbox, self._keys["inbox"])
            except (Refused, ValidationError) as e:
                why = str(e) if isinstance(e, Refused) else _first_error(e)
                self.problems.report("inbox", f"secure mode: the inbox {path} is refused ({why}): not written by the "
                                     "aggregator, or altered; nothing is revealed from it")
                return
            self.problems.clear("inbox")
            if inbox.member != self.paths.email:
                return
            if inbox.rounds:
                newest = max(e.round for e in inbox.rounds)
                self._closed_seen = newest if self._closed_seen is None else max(self._closed_seen, newest)
            answers = self._load_answers()
            before = {kind: set(book) for kind, book in answers.items()}
            changed = False
            for entry in inbox.rounds:
                try:
                    changed |= self._answer_round(entry, answers)
                except OSError as e:
                    self.problems.report("state-write", f"secure mode: cannot record an answer ({e}): nothing "
                                         "revealed")
                    return
            if changed:  # keep what is new, and what the inbox shows the aggregator still lacks
                lacking = {"views": {e.round for e in inbox.rounds if e.status == "unmasking" and e.sealed},
                           "reveals": {e.round for e in inbox.rounds if e.status == "unmasking"}}
                for kind, book in answers.items():
                    for r in [r for r in book if r in before[kind] and r not in lacking[kind]]:
                        del book[r]
                self._write_answers(answers)

    def _answer_round(self, entry: InboxRound, answers: dict[str, dict[int, object]]) -> bool:
        """Sign the view and reveal what ``entry`` allows; True if ``answers`` changed."""
        state, me, r = self._state, self.paths.email, entry.round
        if entry.status != "unmasking":
            return False
        h_text = state.used.get(r)
        if h_text is None:
            return False  # this member did not upload in round r: nothing to sign or reveal
        if h_text != entry.epoch_hash:
            self._say(r, "it was used under another epoch and is asked about again under a new one (a replay)")
            return False
        if not state.in_window(r):
            self._say(r, f"it is older than the {REVEAL_HORIZON} rounds this member still answers")
            return False
        h = b64_bytes(h_text)
        epoch = self._epoch_with(h)
        if epoch is None:
            return False
        peers = epoch.neighbours(me)
        view_rec, changed = state.views.get(r), False
        if view_rec is None:
            view, problem = _view_from(entry, epoch, peers, me, h)
            if problem:
                self._say(r, problem)
                return False
            state.views[r] = view_rec = {"survivors": view.survivors, "statuses": b64(secagg.pack_bits(view.statuses)),
                                         "shares": self._open_shares(entry, h, peers, view)}
            state.save()  # one view per round, recorded (with the shares it saw) before it leaves
        else:
            view = secagg.View(h, r, me, view_rec["survivors"],
                               tuple(secagg.unpack_bits(b64_bytes(view_rec["statuses"]), len(peers))))
        if r not in answers["views"]:
            answers["views"][r] = SignedView(round=r, epoch_hash=h_text, survivors=view.survivors,
                                             statuses=view_rec["statuses"],
                                             signature=b64(self._me.sign(secagg.view_message(view))))
            changed = True
        if r in state.answered or not entry.views:
            return changed
        if entry.statuses != view_rec["statuses"] or entry.survivors != view.survivors:
            self._say(r, "the inbox changed the round's statuses after this member signed its view")
            return changed
        agree, disagree = self._check_views(entry, epoch, peers, view)
        if disagree:
            log.warning("secure round %d: %d neighbour(s) signed a view that disagrees with ours (the aggregator told "
                        "members different things, or a neighbour lies)", r, len(disagree))
        if len(agree) < epoch.threshold:
            self._say(r, f"only {len(agree)} of the {epoch.threshold} neighbours needed signed a consistent view "
                         "(a consistency round an aggregator lying about dropouts cannot pass)")
            return changed
        entries, record = self._reveal(r, h, peers, view, view_rec["shares"])
        state.answered[r] = record
        state.save()  # never both for one (round, peer), recorded before the reveal leaves
        plain = secagg.pack_reveal(r, entries)
        answers["reveals"][r] = SealedReveal(round=r, epoch_hash=h_text, sealed=b64(secagg.seal(
            self._keys["reveal"], plain, secagg.reveal_aad(h, r))))
        return True

    def _open_shares(self, entry: InboxRound, h: bytes, peers: list[str], view: secagg.View) -> list[str | None]:
        """The shares the surviving neighbours sealed for this member, opened (base64; None for one that does not
        open), one per surviving neighbour in order: kept with the view, since the inbox carries them only until the
        aggregator has the view."""
        me, r, size = self.paths.email, entry.round, secagg.SEALED_SHARE_BYTES
        sealed, out = b64_bytes(entry.sealed), []
        for p in [p for p, alive in zip(peers, view.statuses) if alive]:
            block, sealed = sealed[:size], sealed[size:]
            try:
                share = secagg.open_share(secagg.share_key(self.pair(p), h, r, p, me), block)
                out.append(b64(secagg.seed_bytes(share)))
            except (InvalidTag, ValueError):
                log.warning("secure round %d: the share sealed by %s does not open: it will not be revealed", r, p)
                out.append(None)
        return out

    def _check_views(self, entry: InboxRound, epoch: Epoch, peers: list[str], view: secagg.View):
        verified = {}
        try:
            packed = secagg.unpack_views(b64_bytes(entry.views), len(peers), epoch.degree)
        except ValueError as e:
            self._say(entry.round, f"its views are malformed ({e})")
            return [], []
        for j, got in zip(peers, packed):
            if got is None:
                continue
            survivors, bits, signature = got
            try:
                theirs = secagg.View(view.epoch_hash, entry.round, j, survivors,
                                     tuple(secagg.unpack_bits(bits, epoch.degree)))
            except ValueError:
                continue
            keys = self._book.keys_of(j)
            if keys is not None and identity.verify(keys.identity, secagg.view_message(theirs), signature):
                verified[j] = theirs
            else:
                log.warning("secure round %d: a view said to be %s's does not verify under its pinned key: ignored",
                            entry.round, j)
        return secagg.consistent_signers(view, peers, verified, {j: epoch.neighbours(j) for j in verified})

    def _reveal(self, r: int, h: bytes, peers: list[str], view: secagg.View, shares: list[str | None]):
        """Per the signed view: the share of each neighbour it saw survive (as it opened it), the round key with each
        it saw drop; never the other half of an earlier answer for the same (round, peer)."""
        before = self._state.answered.get(r, {})
        opened = iter(shares)
        entries, record = [], {}
        for p, survived in zip(peers, view.statuses):
            if survived:
                share = next(opened)
                ok = share is not None and before.get(p) != "key"
                entries.append(secagg.seed_value(b64_bytes(share)) if ok else None)
            else:
                ok = before.get(p) != "share"
                entries.append(secagg.round_key(self.pair(p), h, r) if ok else None)
            if ok:
                record[p] = "share" if survived else "key"
        return entries, record

    def _say(self, r: int, why: str) -> None:
        """Say once per round and reason why nothing is revealed (forgotten with the round, past the window)."""
        if self._said.get(r) != why:
            self._said[r] = why
            log.warning("secure round %d: nothing revealed: %s", r, why)
        for old in [x for x in self._said if x < self._state.last_used - REVEAL_HORIZON]:
            del self._said[old]

    def _load_answers(self) -> dict[str, dict[int, object]]:
        """The answers this member last wrote (its own file, MAC-checked)."""
        if self._answers is None:
            raw = read_capped(self.paths.answers_file())
            try:
                self._answers = read_mac(raw or b"", SecureAnswers, self._keys["answers"])
            except (Refused, ValidationError):
                self._answers = SecureAnswers(email=self.paths.email, created_at=utc_now())
        return {"views": {v.round: v for v in self._answers.views},
                "reveals": {v.round: v for v in self._answers.reveals}}

    def _write_answers(self, answers: dict[str, dict[int, object]]) -> None:
        body = SecureAnswers(email=self.paths.email, created_at=utc_now(),
                             views=[answers["views"][r] for r in sorted(answers["views"])][-16:],
                             reveals=[answers["reveals"][r] for r in sorted(answers["reveals"])][-16:])
        try:
            self.paths.upload_dir().mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.paths.answers_file(), mac_file(body, self._keys["answers"]))
            self._answers = body
            self.problems.clear("answers-write")
        except OSError as e:
            self.problems.report("answers-write", f"secure mode: cannot write {self.paths.answers_file()}: {e}")


def _view_from(entry: InboxRound, epoch: Epoch, peers: list[str], me: str, h: bytes):
    """This member's view of a closed round from its inbox entry, or why it signs none."""
    if not entry.survived:
        return None, "the inbox says this member's upload did not arrive"
    try:
        statuses = tuple(secagg.unpack_bits(b64_bytes(entry.statuses), len(peers)))
        sealed = b64_bytes(entry.sealed)
    except ValueError as e:
        return None, f"the inbox entry is malformed ({e})"
    alive = sum(statuses)
    if len(sealed) != alive * secagg.SEALED_SHARE_BYTES:
        return None, "the inbox does not carry one sealed share for each surviving neighbour"
    if not max(epoch.min_survivors, alive + 1) <= entry.survivors <= len(epoch.cohort):
        return None, (f"the inbox claims {entry.survivors} survivors, outside {max(epoch.min_survivors, alive + 1)}.."
                      f"{len(epoch.cohort)} (fewer than the epoch requires, or fewer than this member sees)")
    return secagg.View(h, entry.round, me, entry.survivors, statuses), None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "the file"
    return f"{loc}: {err.get('msg')}"
