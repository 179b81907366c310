"""The member's side of secure aggregation: its key, the epoch check, its round upload and its reveals.

Order within a round (one window, aligned to UTC multiples of the epoch's ``window_s``): check the epoch, answer
the inbox (what earlier rounds need revealed, each answer recorded before it leaves), charge the ledger for the
release, then write the round file. The window's raw mean never leaves this process: the upload holds it only
quantized, plus a noise share, plus masks that only the whole cohort's uploads cancel.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
from collections import Counter
from functools import lru_cache
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

from pydantic import ValidationError

from shared import __version__
from shared import secagg
from shared.atomic import PRIVATE, atomic_write_bytes, atomic_write_json, ensure_private_dir, read_capped
from shared.ledger import BudgetExceeded, Ledger, Spend
from shared.safezone import day_epsilon as monitors_day_epsilon
from shared.logs import Problems
from shared.paths import Paths
from shared.schema import CPU_BOUNDS, utc_now
from shared.secnoise import NoiseSpec, epsilon_of, quantize, release_event, sample_share
from shared.secure_schema import (
    UNIT_WORDS,
    Epoch,
    Inbox,
    Reveal,
    SecureKey,
    SecureUpload,
    b64_bytes,
    mean_sensitivity_for,
    releases_for,
)
from shared.settings import Settings

log = logging.getLogger("cpu_tracker.member")
KEEP_UPLOADS = 4  # round files kept: the aggregator reads reveals for round r in the uploads of r + 1 .. r + 3
KEEP_REVEALED_ROUNDS = 200
MAX_EPOCH_BYTES = 1 << 26  # the cohort, its keys and graph: about 7 MB at 10,000 members


def round_of(window_end: datetime, window_s: float) -> int:
    """The round a window ending at ``window_end`` is: round r covers [r * window_s, (r + 1) * window_s)."""
    return math.floor(window_end.timestamp() / window_s + 0.5) - 1


def bin_of(mean: float, bins: int) -> int:
    lo, hi = CPU_BOUNDS
    return min(bins - 1, max(0, math.floor((mean - lo) / (hi - lo) * bins)))


def window_vector(raw_mean: float, epoch: Epoch, rng=None) -> list[int]:
    """The member's vector for one round, before masking: its quantized window mean, the one-hot histogram of that
    mean over ``epoch.bins`` bins, plus its noise share. Only this member ever sees it."""
    mean = min(max(float(raw_mean), CPU_BOUNDS[0]), CPU_BOUNDS[1])
    x = [quantize(mean, epoch.scale, rng)] + [0] * epoch.bins
    x[1 + bin_of(mean, epoch.bins)] = 1
    noise = sample_share(epoch.noise, epoch.bins, rng)
    return [a + b for a, b in zip(x, noise)]


def epoch_epsilon(epoch: Epoch) -> float:
    """The epsilon, for the epoch's unit, of its releases when only ``min_survivors`` members survive (the least
    noise a published round can carry), by dp-accounting: a whole UTC day of releases for ``cpu_day``."""
    event = release_event(epoch.noise, epoch.noise.shares_for)
    return epsilon_of([event] * releases_for(epoch.unit, epoch.window_s), epoch.delta)


def epoch_problem(epoch: Epoch, me: str, my_key: str, settings: Settings) -> str | None:
    """Why this member must not take part in ``epoch`` (None: it may). It must be listed with its own key, by the
    aggregator it trusts, at its own window length, and the threshold, noise, unit and cohort must be no weaker
    than its own settings."""
    n = len(epoch.cohort)
    if epoch.aggregator != settings.aggregator:
        return f"epoch {epoch.epoch} comes from {epoch.aggregator}, not from the aggregator {settings.aggregator}"
    listed = epoch.key_of(me)
    if listed is None:
        return f"this datasite is not in epoch {epoch.epoch} yet (its key is enrolled at the next epoch)"
    if listed != my_key:
        return (f"epoch {epoch.epoch} lists another key for this datasite ({secagg.fingerprint(b64_bytes(listed))}, "
                f"ours is {secagg.fingerprint(b64_bytes(my_key))}): waiting for an epoch with ours")
    if abs(epoch.window_s - settings.interval_s) > 1e-9:
        return f"epoch {epoch.epoch} uses {epoch.window_s:g} s windows, this member {settings.interval_s:g} s (interval_s)"
    if n < settings.min_cohort or epoch.min_survivors < settings.min_cohort:
        return (f"epoch {epoch.epoch} has {n} members and needs {epoch.min_survivors} survivors; this member needs at "
                f"least {settings.min_cohort} (min_cohort)")
    if epoch.unit != settings.secure_unit:  # an epsilon per day says little about one window, and vice versa
        return (f"epoch {epoch.epoch} protects {UNIT_WORDS[epoch.unit]}, this member asks for "
                f"{UNIT_WORDS[settings.secure_unit]} (secure_unit)")
    if epoch.units_per_window != settings.samples_per_window:
        return f"epoch {epoch.epoch} counts {epoch.units_per_window} seconds a window, this member {settings.samples_per_window}"
    needed = mean_sensitivity_for(epoch.unit, epoch.scale, epoch.units_per_window)
    if epoch.noise.mean_sensitivity < needed:
        return (f"epoch {epoch.epoch}'s noise is calibrated for a sensitivity of {epoch.noise.mean_sensitivity}, "
                f"less than the {needed} its unit needs")
    try:
        eps = epoch_epsilon(epoch)
    except ValueError as e:
        return f"epoch {epoch.epoch}'s noise cannot be accounted: {e}"
    mine = settings.secure_target
    if eps > mine * (1 + 1e-6):
        return (f"epoch {epoch.epoch}'s noise gives epsilon {eps:.4g} per unit with {epoch.min_survivors} survivors, "
                f"more than this member's secure_epsilon {mine:g}")
    if epoch.delta > settings.secure_delta:
        return f"epoch {epoch.epoch}'s delta {epoch.delta:g} exceeds this member's secure_delta {settings.secure_delta:g}"
    degree = len(epoch.neighbours[me])
    if not degree // 2 < epoch.threshold <= degree:
        return f"epoch {epoch.epoch}'s threshold {epoch.threshold} is not more than half of this member's {degree} neighbours"
    return None


@lru_cache(maxsize=8)
def _spec(noise_json: str) -> NoiseSpec:
    """A ledger line's NoiseSpec: the day's thousands of releases share a few, parsed once each."""
    return NoiseSpec.model_validate_json(noise_json)


class DayBudgetExceeded(BudgetExceeded):
    def __init__(self, day: str, spent: float, cap: float):
        RuntimeError.__init__(self, f"secure release skipped: with it, epsilon {spent:.4g} (dp-accounting, delta "
                              f"from secure_delta) would be spent on the UTC day {day}, over secure_epsilon {cap:g}")
        self.spent = spent


def day_check(cap: float, delta: float) -> Callable:
    """The ledger's further check for the ``cpu_day`` unit: the day's secure releases, composed by dp-accounting,
    and the private alerts' spends on that day (added: ``shared.safezone.day_epsilon``) stay within ``cap`` on every
    UTC day the new spend's window touches."""

    def check(recorded, new: Spend) -> None:
        day = new.window_start.replace(hour=0, minute=0, second=0, microsecond=0)
        while day < new.window_end:
            end = day + timedelta(days=1)
            same = Counter((s.noise, s.survivors) for s in (*recorded, new) if s.unit == "cpu_day"
                           and s.noise is not None and s.window_start < end and s.window_end > day)
            events = [ev for (noise, survivors), n in same.items() for ev in [release_event(_spec(noise), survivors)] * n]
            spent = epsilon_of(events, delta) + monitors_day_epsilon((*recorded, new), day, end)  # + private alerts
            if spent > cap * (1 + 1e-9):
                raise DayBudgetExceeded(day.date().isoformat(), spent, cap)
            day = end

    return check


@dataclass
class Revealed:
    """What this member has revealed, per epoch, round and peer ("share" or "key"): kept on disk (0600) so that
    no restart can make it reveal the other one for the same peer and round."""

    path: object
    done: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path) -> "Revealed":
        try:
            return cls(path, json.loads(path.read_text("utf-8")))
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as e:  # refuse to guess: revealing again could hand out both halves
            raise RevealStateBroken(f"{path} is unreadable ({e}): secure rounds pause until it is restored or "
                                    "removed together with the secure key (a new key starts afresh)") from e

    def get(self, epoch: int, round_: int, peer: str) -> str | None:
        return self.done.get(str(epoch), {}).get(str(round_), {}).get(peer)

    def answered(self, epoch: int, round_: int) -> bool:
        return str(round_) in self.done.get(str(epoch), {})

    def record(self, epoch: int, round_: int, answers: dict[str, str]) -> None:
        """Record ``answers`` durably before anything is revealed."""
        rounds = self.done.setdefault(str(epoch), {})
        rounds.setdefault(str(round_), {}).update(answers)
        for e in sorted(self.done, key=int)[:-2]:  # the current and the previous epoch
            del self.done[e]
        for r in sorted(rounds, key=int)[:-KEEP_REVEALED_ROUNDS]:
            del rounds[r]
        atomic_write_json(self.path, self.done, indent=None, mode=PRIVATE)


class RevealStateBroken(RuntimeError):
    pass


@dataclass
class SecureMember:
    """Takes part in the aggregator's secure rounds. All file I/O of the member's secure mode lives here."""

    paths: Paths
    settings: Settings
    problems: Problems
    ledger: Callable[[], Ledger | None]
    _private: bytes | None = None
    _public_b64: str = ""
    _epochs: dict[int, Epoch] = field(default_factory=dict)
    _pairs: dict[tuple[int, str], bytes] = field(default_factory=dict)
    _revealed: Revealed | None = None
    _epoch_seen: tuple[tuple[int, int, int], str | None] | None = None  # (stat signature, why refused) of the file

    # -- key ------------------------------------------------------------------------------------------
    def ensure_key(self) -> bool:
        """Load (or create, 0600, outside ``datasites/``) the X25519 key and publish its public half."""
        try:
            if self._private is None:
                ensure_private_dir(self.paths.secure_private)
                path = self.paths.secure_private / "x25519.key"
                try:
                    raw = path.read_bytes()
                except FileNotFoundError:
                    raw = secagg.new_private_key()
                    atomic_write_bytes(path, raw, mode=PRIVATE)
                if len(raw) != 32:
                    raise OSError(f"{path} is not a 32-byte X25519 key: remove it to make a new one")
                self._private = raw
                self._public_b64 = base64.b64encode(secagg.public_key(raw)).decode()
            key_file = self.paths.secure_key_file()  # in the report folder: the aggregator alone reads it
            current = _read_json(key_file)
            if not current or current.get("x25519") != self._public_b64:
                body = SecureKey(email=self.paths.email, x25519=self._public_b64, created_at=utc_now())
                atomic_write_json(key_file, body.model_dump(mode="json"))
        except OSError as e:
            self.problems.report("secure-key", f"cannot set up the secure-aggregation key: {e}")
            return False
        self.problems.clear("secure-key", "secure-aggregation key in order again")
        return True

    # -- epoch ----------------------------------------------------------------------------------------
    def epoch_for(self, round_: int) -> Epoch | None:
        """The epoch that covers ``round_`` and that this member accepts (logged once when there is none)."""
        path = self.paths.epoch_file(self.settings.aggregator)
        try:  # parsed again only when it changed: at 10,000 members it is megabytes, read every window
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
        chosen = next((e for e in sorted(self._epochs.values(), key=lambda e: -e.epoch)
                       if e.first_round <= round_ <= e.last_round()), None)
        if chosen is not None and problem is None:
            problem = epoch_problem(chosen, self.paths.email, self._public_b64, self.settings)
        elif chosen is None and problem is None:
            problem = f"no epoch covers round {round_} yet: waiting for the aggregator's next one"
        if problem:
            self.problems.report("epoch", f"secure mode: {problem}", logging.WARNING)
            return None
        self.problems.clear("epoch", f"secure mode: taking part in epoch {chosen.epoch} "
                            f"({len(chosen.cohort)} members, {UNIT_WORDS[chosen.unit]} at epsilon {chosen.epsilon:g})")
        return chosen

    def _read_epoch(self, path) -> str | None:
        """Parse the epoch file into ``_epochs`` (the latest two kept); why it is refused, or None."""
        try:
            epoch = Epoch.model_validate_json(read_capped(path, MAX_EPOCH_BYTES) or b"")
        except ValidationError as e:
            return (f"the epoch file {path} is not valid and is refused ({_first_error(e)}); this member publishes "
                    "nothing until the aggregator fixes it")
        self._epochs[epoch.epoch] = epoch
        for old in sorted(self._epochs)[:-2]:
            del self._epochs[old]
        return None

    def pair(self, epoch: Epoch, peer: str) -> bytes:
        key = (epoch.epoch, peer)
        if key not in self._pairs:
            self._pairs = {k: v for k, v in self._pairs.items() if k[0] >= epoch.epoch - 1}
            self._pairs[key] = secagg.pair_secret(self._private, b64_bytes(epoch.key_of(peer)), me=self.paths.email,
                                                  peer=peer, epoch_salt=b64_bytes(epoch.salt))
        return self._pairs[key]

    # -- reveals --------------------------------------------------------------------------------------
    def reveals(self, now_round: int) -> list[Reveal]:
        """Answers to the inbox's open rounds not yet answered, each recorded before it is returned. A round with
        fewer than ``min_survivors`` survivors, or an inbox that contradicts itself, gets none; a peer already
        answered the other way for that round (even before a restart) gets nothing more."""
        if self._revealed is None:
            self._revealed = Revealed.load(self.paths.secure_private / "revealed.json")
        raw = read_capped(self.paths.inbox_file(self.paths.email, self.settings.aggregator))
        if raw is None:
            return []
        try:
            inbox = Inbox.model_validate_json(raw)
        except ValidationError as e:
            self.problems.report("inbox", f"secure mode: the inbox is not valid and is ignored ({_first_error(e)})")
            return []
        self.problems.clear("inbox")
        if inbox.member != self.paths.email:
            return []
        out = []
        for entry in inbox.rounds:
            epoch = self._epochs.get(entry.epoch or inbox.epoch)
            if (epoch is None or entry.status != "unmasking" or entry.round >= now_round
                    or not epoch.first_round <= entry.round <= epoch.last_round()
                    or self.paths.email not in epoch.neighbours
                    or self._revealed.answered(epoch.epoch, entry.round)):
                continue
            reveal, answers = self._answer(epoch, entry)
            self._revealed.record(epoch.epoch, entry.round, answers)  # before the answers leave
            if reveal is not None:
                out.append(reveal)
        return out[-8:]

    def _answer(self, epoch: Epoch, entry) -> tuple[Reveal | None, dict[str, str]]:
        """For one round: a share for each surviving neighbour, a round key for each dropped one, never both."""
        me = self.paths.email
        problem = _inbox_problem(entry, epoch)
        if problem is not None:
            log.warning("secure round %d: nothing revealed: %s", entry.round, problem)
            return None, {}
        shares, keys, answers = {}, {}, {}
        for peer in epoch.neighbours[me]:
            before = self._revealed.get(epoch.epoch, entry.round, peer)
            if peer in entry.survivors and peer in entry.sealed and before != "key":
                try:
                    share = secagg.unseal(secagg.seal_key(self.pair(epoch, peer)), entry.sealed[peer],
                                          secagg.share_aad(epoch.epoch, entry.round, peer, me))
                    secagg.unpack_share(share)
                except Exception as e:  # noqa: BLE001 - InvalidTag or a malformed share: not revealed
                    log.warning("secure round %d: the share sealed by %s does not open (%s): not revealed",
                                entry.round, peer, type(e).__name__)
                    continue
                shares[peer], answers[peer] = base64.b64encode(share).decode(), "share"
            elif peer in entry.dropped and before != "share":
                key = secagg.round_key(self.pair(epoch, peer), entry.round)
                keys[peer], answers[peer] = base64.b64encode(key).decode(), "key"
        return (Reveal(round=entry.round, shares=shares, keys=keys) if shares or keys else None), answers

    # -- the round ------------------------------------------------------------------------------------
    def publish(self, raw_mean: float, start: datetime, end: datetime) -> bool:
        """Take part in the round that the window [start, end) is: True if an upload was written."""
        if not self.ensure_key():
            return False
        round_ = round_of(end, self.settings.interval_s)
        epoch = self.epoch_for(round_)
        if epoch is None:
            return False
        aligned_start = datetime.fromtimestamp(epoch.window(round_)[0], timezone.utc)
        if start > aligned_start + timedelta(seconds=1):  # a partial window: its sensitivity is larger
            log.info("secure mode: the window ending %s began late (%s): waiting for the next whole round",
                     end.isoformat(timespec="seconds"), start.isoformat(timespec="seconds"))
            return False
        try:
            reveals = self.reveals(round_)
        except (RevealStateBroken, OSError) as e:
            self.problems.report("reveals", str(e), logging.ERROR)
            return False
        self.problems.clear("reveals")
        ledger = self.ledger()
        if ledger is None:
            return False
        spend = Spend(
            released_at=utc_now(), window_start=start, window_end=end, epsilon=self._release_epsilon(epoch),
            delta=epoch.delta, mechanism=f"secure-{epoch.noise.family}", unit=epoch.unit,
            n_samples=epoch.units_per_window, noise=epoch.noise.model_dump_json(), survivors=epoch.noise.shares_for,
        )
        also = day_check(self.settings.secure_target, epoch.delta) if epoch.unit == "cpu_day" else None
        try:
            if also is not None and ledger.retention < timedelta(days=1):
                raise OSError("the ledger keeps less than a day (add a budget with horizon_s = 86400) and the "
                              "cpu_day unit needs the whole day")
            ledger.admit(spend, also)
            self.problems.clear("budget", "privacy budget available again: secure rounds resume")
        except BudgetExceeded as e:
            if "budget" not in self.problems.active:
                self.problems.report("budget", f"{e}; rounds resume by themselves once the span rolls past")
            return self._upload_reveals_only(epoch, round_, reveals)
        except OSError as e:
            self.problems.report("ledger-write", f"cannot record the secure release in the ledger, not taking part: {e}")
            return False
        self.problems.clear("ledger-write")
        upload = self._upload(epoch, round_, raw_mean)
        return self._write(upload.model_copy(update={"reveals": reveals, "unit": epoch.unit,
                                                     "epsilon": spend.epsilon}))

    def _release_epsilon(self, epoch: Epoch) -> float:
        """One release's epsilon for its unit with the fewest survivors (the ledger's rolling budgets add these)."""
        return epsilon_of([release_event(epoch.noise, epoch.noise.shares_for)], epoch.delta)

    def _upload(self, epoch: Epoch, round_: int, raw_mean: float) -> SecureUpload:
        me = self.paths.email
        peers = epoch.neighbours[me]
        values = window_vector(raw_mean, epoch)
        seed = secagg.new_seed()
        keys = {p: secagg.round_key(self.pair(epoch, p), round_) for p in peers}
        y = secagg.masked(values, self_seed=seed, round_keys=keys, me=me)
        shares = secagg.split_seed(seed, peers, epoch.threshold)
        sealed = {p: secagg.seal(secagg.seal_key(self.pair(epoch, p)), secagg.pack_share(shares[p]),
                                 secagg.share_aad(epoch.epoch, round_, me, p)) for p in peers}
        return SecureUpload(app_version=__version__, email=me, epoch=epoch.epoch, round=round_, created_at=utc_now(),
                            vector=secagg.encode_vector(y), sealed=sealed)

    def _upload_reveals_only(self, epoch: Epoch, round_: int, reveals: list[Reveal]) -> bool:
        """Out of budget: no masked vector this round, but the reveals others' rounds need still go out (they hold
        nothing about this member's activity). The round file then has an empty vector and no sealed shares, which
        the aggregator does not count."""
        if reveals:
            empty = SecureUpload(app_version=__version__, email=self.paths.email, epoch=epoch.epoch, round=round_,
                                 created_at=utc_now(), vector="", sealed={}, reveals=reveals)
            self._write(empty)
        return False

    def _write(self, upload: SecureUpload) -> bool:
        folder = self.paths.upload_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.paths.upload_file(upload.round), upload.model_dump_json().encode())
            for old in folder.glob("r*.json"):
                stem = old.stem[1:]
                if stem.isdigit() and int(stem) <= upload.round - KEEP_UPLOADS:
                    old.unlink(missing_ok=True)
        except OSError as e:
            self.problems.report("upload-write", f"cannot write the secure round file in {folder}: {e}. Free disk space.")
            return False
        self.problems.clear("upload-write", "secure round files written again")
        return bool(upload.vector)


def _inbox_problem(entry, epoch: Epoch) -> str | None:
    cohort = set(epoch.emails())
    if not set(entry.survivors) | set(entry.dropped) <= cohort:
        return "the inbox names members outside the epoch"
    if set(entry.survivors) | set(entry.dropped) != cohort:
        return "the inbox does not account for every member of the cohort"
    if len(entry.survivors) < epoch.min_survivors:
        return f"only {len(entry.survivors)} survivors, fewer than the {epoch.min_survivors} the epoch requires"
    return None


def _read_json(path) -> dict | None:
    raw = read_capped(path)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "the file"
    return f"{loc}: {err.get('msg')}"
