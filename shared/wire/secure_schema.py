"""Wire formats of secure aggregation, protocol version 2: who writes each file, who reads it, how it is signed.

Same compatibility contract as ``shared.wire.schema``: fields are never removed or renamed, new ones are optional,
``schema_version`` changes only with a breaking change. Version 2 is one: files are signed, the epoch is compact and
the consistency round is new, so a version-1 member refuses a version-2 epoch (and is told so in its log) and the
reverse. Layout on SyftBox (``shared.paths``):

- ``<member>/public/did.json``  the member's identity keys (``shared.secure.identity``, syft-crypto's format),
  world-readable.
- ``<member>/app_data/cpu_tracker/secure_join.json``  ``SecureJoin``, the aggregator only: "count me in".
- ``<aggregator>/app_data/cpu_tracker_epoch/epoch.json``  ``Epoch``, the cohort only: members, graph seed, parameters.
- ``<aggregator>/app_data/cpu_tracker_epoch/rounds.json``  ``RoundOutcomes``, the cohort only: no emails.
- ``<member>/app_data/cpu_tracker/secure/r<round>.json``  ``SecureUpload``, the aggregator only.
- ``<member>/app_data/cpu_tracker/secure/answers.json``  ``SecureAnswers``, the aggregator only: views and reveals.
- ``<aggregator>/app_data/cpu_tracker_inbox/<member>/inbox.json``  ``Inbox``, that member only.

Authentication. Files other members check (the epoch, the round outcomes) carry the writer's Ed25519 signature
(``signature``); files between one member and the aggregator alone (join, upload, answers, inbox) carry an
HMAC-SHA256 (``mac``) under a key both derive from their X25519 keys (``secagg.aggregator_secret``): the relay, which
can write any file it stores, can forge neither. The signature or MAC is the file's last member and covers exactly
the bytes before it (``message``), so a reader checks the bytes it read, without re-encoding: for a file of kind K
the signed bytes are ``b"cpu_tracker secagg v2|" + K + b"|" + <the file up to its last member, closed by "}">``.
A member's view of a round (``SignedView``) is signed with its Ed25519 key, since its neighbours check it.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import math
import re
from datetime import datetime
from typing import Callable, Literal, TypeVar, get_args

from pydantic import AwareDatetime, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import to_json

from shared.paths import is_datasite_email
from shared.privacy import CPU_BOUNDS, DAY_S, DAY_UNIT, SECOND_UNIT, WINDOW_UNIT, SecureUnit
from shared.wire.schema import _Wire
from shared.secure.secagg import HASH_BYTES, MODULUS_BITS, PROTOCOL, neighbours_in, ring_order, shamir_threshold
from shared.secure.secnoise import NoiseSpec

JOIN_KIND = "cpu_tracker.secure_join"
EPOCH_KIND = "cpu_tracker.secure_epoch"
UPLOAD_KIND = "cpu_tracker.secure_round"
ANSWERS_KIND = "cpu_tracker.secure_answers"
INBOX_KIND = "cpu_tracker.secure_inbox"
ROUNDS_KIND = "cpu_tracker.secure_rounds"
Unit = SecureUnit
UNIT_WORDS = {
    SECOND_UNIT: "one second of a member's CPU activity",
    WINDOW_UNIT: "a member's whole window",
    DAY_UNIT: "a member's whole UTC day",
}
DAY_RELEASE_S = 300.0  # the cpu_day unit releases about every 5 minutes


def b64(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).decode()


def b64_bytes(text: str) -> bytes:
    """Strict base64 (binascii.Error, a ValueError, on anything else); the standard library's C codec, called
    directly: a round decodes hundreds of thousands."""
    return binascii.a2b_base64(text, strict_mode=True)


def _b64(text: str, n: int | None, what: str) -> str:
    try:
        raw = b64_bytes(text)
    except ValueError:
        raise ValueError(f"{what} must be base64") from None
    if n is not None and len(raw) != n:
        raise ValueError(f"{what} must hold {n} bytes, got {len(raw)}")
    return text


def _email(v: str) -> str:
    if not is_datasite_email(v):
        raise ValueError(f"{v!r} is not a datasite email")
    return v


def _hash(v: str) -> str:
    return _b64(v, HASH_BYTES, "an epoch hash")


# ---------------------------------------------------------------------------------------------------
# Signed and MAC'd files: the signature is the last member and covers the bytes before it
# ---------------------------------------------------------------------------------------------------
class Refused(ValueError):
    """A protocol file whose signature or MAC is missing or does not verify."""


_TRAILER = re.compile(rb',"(signature|mac)":"([A-Za-z0-9+/=]{1,200})"\}\Z')
M = TypeVar("M", bound=_Wire)


def message(kind: str, body: bytes) -> bytes:
    """What a file's signature or MAC covers: the protocol, the file's kind, and its bytes before the trailer."""
    return PROTOCOL + b"|" + kind.encode() + b"|" + body


def _body(model: _Wire) -> bytes:
    return model.model_dump_json(exclude={"signature", "mac"}).encode()


def _with_trailer(body: bytes, name: str, value: bytes) -> bytes:
    if not body.endswith(b"}") or body == b"{}":
        raise ValueError("a signed file needs at least one member")
    return body[:-1] + b',"' + name.encode() + b'":"' + binascii.b2a_base64(value, newline=False) + b'"}'


def _split(raw: bytes, name: str) -> tuple[bytes, bytes]:
    found = _TRAILER.search(raw, max(0, len(raw) - 256))
    if found is None or found.group(1) != name.encode():
        raise Refused(f"it carries no {name} as its last member")
    return raw[:found.start()] + b"}", binascii.a2b_base64(found.group(2))


def signed_file(model: _Wire, sign: Callable[[bytes], bytes]) -> bytes:
    """The bytes of ``model`` with its writer's Ed25519 signature (``sign``: ``identity.Identity.sign``)."""
    body = _body(model)
    return _with_trailer(body, "signature", sign(message(model.kind, body)))


def read_signed(raw: bytes, model: type[M], verify: Callable[[bytes, bytes], bool]) -> tuple[M, bytes]:
    """``raw`` parsed as ``model`` once its signature verifies (``verify(message, signature)``), and the signed
    message (its SHA-256 is the file's identity, e.g. the epoch's hash). Refused or pydantic's ValidationError."""
    body, signature = _split(raw, "signature")
    parsed = model.model_validate_json(raw)
    signed = message(parsed.kind, body)
    if not verify(signed, signature):
        raise Refused("its signature does not verify under the writer's pinned identity key")
    return parsed, signed


def mac_file(model: _Wire, key: bytes) -> bytes:
    """The bytes of ``model`` with an HMAC-SHA256 under ``key`` (``secagg.mac_key``)."""
    body = _body(model)
    return _with_trailer(body, "mac", hmac.digest(key, message(model.kind, body), "sha256"))


def read_mac(raw: bytes, model: type[M], key: bytes) -> M:
    """``raw`` parsed as ``model`` once its MAC verifies under ``key``. Refused or pydantic's ValidationError."""
    body, tag = _split(raw, "mac")
    parsed = model.model_validate_json(raw)
    if not hmac.compare_digest(hmac.digest(key, message(parsed.kind, body), "sha256"), tag):
        raise Refused("its MAC does not verify (not written by the datasite it claims, or altered)")
    return parsed


def epoch_hash(signed: bytes) -> bytes:
    """h_E: the SHA-256 of an epoch's signed message. Round keys, sealed shares, views and reveals are bound to it."""
    return hashlib.sha256(signed).digest()


# ---------------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------------
class SecureJoin(_Wire):
    """A member asks its aggregator to count it in the next epoch, naming the identity key of its did.json (the
    aggregator pins that document's keys). MAC'd with the member-aggregator key: only the holder of the did.json's
    prekey can write it."""

    schema_version: Literal[2] = 2
    kind: Literal["cpu_tracker.secure_join"] = JOIN_KIND
    email: str
    identity: str = Field(description="The member's Ed25519 identity key (base64, 32 bytes), as in its did.json.")
    created_at: AwareDatetime
    app_version: str = ""
    mac: str = ""

    _check_email = field_validator("email")(_email)

    @field_validator("identity")
    @classmethod
    def _key(cls, v: str) -> str:
        return _b64(v, 32, "identity")


class Epoch(_Wire):
    """One cohort and its parameters, for rounds ``first_round`` .. ``first_round + rounds - 1``; round r is
    [r * window_s, (r + 1) * window_s) in Unix seconds. Compact: the cohort's emails and a graph seed, from which
    every member derives the ring (``secagg.ring_order``); keys are in each member's did.json. Signed by the
    aggregator; a member checks it against its own minimums before taking part
    (``cpu_tracker_member.secure.epoch_problem``)."""

    schema_version: Literal[2] = 2
    kind: Literal["cpu_tracker.secure_epoch"] = EPOCH_KIND
    epoch: int = Field(ge=1, description="Increases with every new epoch.")
    created_at: AwareDatetime
    aggregator: str
    cohort: list[str] = Field(min_length=2, description="The members' emails, sorted.")
    graph_seed: str = Field(description="Orders the ring: SHA-256(seed || email), base64, 32 bytes.")
    degree: int = Field(ge=1, description="Neighbours per member (the whole cohort up to 30 members).")
    threshold: int = Field(ge=1, description="Shamir shares that rebuild a self-mask seed.")
    min_survivors: int = Field(ge=2, description="Fewer survivors: the round is refused and nothing is revealed.")
    window_s: float = Field(ge=1, le=86400, description="A round's length (the release period).")
    first_round: int = Field(ge=0)
    rounds: int = Field(ge=1, le=10**6, description="Rounds this epoch lasts; a new epoch follows it.")
    deadline_s: float = Field(gt=0, description="Uploads of round r count if seen by (r + 1) * window_s + this.")
    reveal_rounds: int = Field(ge=1, le=100, description="Rounds after r within which its unmasking must finish.")
    modulus_bits: Literal[64] = MODULUS_BITS
    scale: int = Field(ge=1, le=10**6, description="Integers per CPU point in the mean coordinate.")
    bins: int = Field(ge=1, le=1000, description="Equal histogram bins over [0, 100].")
    bounds: tuple[float, float] = CPU_BOUNDS
    units_per_window: int = Field(ge=1, description="Whole seconds a measurement window averages (cpu_second).")
    unit: Unit
    epsilon: float = Field(gt=0, description="Target epsilon per unit (per second, per window, or per UTC day).")
    delta: float = Field(ge=0, lt=1)
    noise: NoiseSpec
    signature: str = ""
    _ring: tuple[list[str], dict[str, int]] | None = PrivateAttr(default=None)

    _check_aggregator = field_validator("aggregator")(_email)

    @field_validator("graph_seed")
    @classmethod
    def _seed(cls, v: str) -> str:
        return _b64(v, 32, "graph_seed")

    @field_validator("cohort")
    @classmethod
    def _cohort(cls, v: list[str]) -> list[str]:
        if any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError("the cohort must be sorted, each member once")
        for m in v:
            _email(m)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Epoch":
        n = len(self.cohort)
        if not (self.degree == n - 1 or (2 <= self.degree < n - 1 and self.degree % 2 == 0)):
            raise ValueError(f"degree {self.degree} must be {n - 1} (complete) or even and below it")
        if not shamir_threshold(self.degree) <= self.threshold <= self.degree:
            raise ValueError(f"threshold {self.threshold} must exceed half the degree ({self.degree}), and not exceed "
                             "it")
        if self.min_survivors > n:
            raise ValueError("min_survivors exceeds the cohort")
        if self.noise.shares_for > self.min_survivors:
            raise ValueError("the noise must be complete with min_survivors shares (noise.shares_for <= min_survivors)")
        if self.noise.n_hist != self.bins:
            raise ValueError("noise.n_hist must equal bins")
        if self.bounds != CPU_BOUNDS:
            raise ValueError(f"bounds must be {CPU_BOUNDS}")
        return self

    @property
    def dim(self) -> int:
        return 1 + self.bins

    def emails(self) -> list[str]:
        return list(self.cohort)

    def neighbours(self, member: str) -> list[str]:
        """``member``'s sorted neighbours, derived from the graph seed (the ring is computed once per epoch object)."""
        if self._ring is None:
            order = ring_order(self.cohort, b64_bytes(self.graph_seed))
            self._ring = (order, {m: i for i, m in enumerate(order)})
        order, position = self._ring
        return neighbours_in(order, position, member, self.degree)

    def window(self, round_: int) -> tuple[float, float]:
        return round_ * self.window_s, (round_ + 1) * self.window_s

    def last_round(self) -> int:
        return self.first_round + self.rounds - 1

    def bin_edges(self) -> list[float]:
        lo, hi = self.bounds
        return [lo + (hi - lo) * i / self.bins for i in range(self.bins + 1)]


class SecureUpload(_Wire):
    """A member's round file: its masked vector and its self-mask seed's shares sealed for its neighbours. MAC'd for
    the aggregator, which alone may read it; holds no unmasked value."""

    schema_version: Literal[2] = 2
    kind: Literal["cpu_tracker.secure_round"] = UPLOAD_KIND
    mode: Literal["secure"] = "secure"
    app_version: str
    email: str
    epoch: int = Field(ge=1)
    epoch_hash: str
    round: int = Field(ge=0)
    created_at: AwareDatetime
    vector: str = Field(description="The masked vector, little-endian uint64 words, base64.")
    sealed: str = Field(description="Sealed shares of this round's self-mask seed, 32 bytes each, one per neighbour in "
                        "the member's sorted neighbour order (base64 of their concatenation).")
    unit: Unit | None = Field(default=None, description="The privacy unit of this release (the epoch's).")
    epsilon: float | None = Field(default=None, ge=0, description="Epsilon of this release for `unit` at the "
                                  "epoch's lying floor of honest members, as the member's ledger charged it.")
    mac: str = ""

    _check_email = field_validator("email")(_email)
    _check_hash = field_validator("epoch_hash")(_hash)


class SignedView(_Wire):
    """A member's view of one round it uploaded in (``secagg.View``), signed with its Ed25519 identity key."""

    round: int = Field(ge=0)
    epoch_hash: str
    survivors: int = Field(ge=0)
    statuses: str = Field(description="Its neighbours' statuses, one bit each in its neighbour order (1: survived).")
    signature: str

    _check_hash = field_validator("epoch_hash")(_hash)

    @field_validator("signature")
    @classmethod
    def _sig(cls, v: str) -> str:
        return _b64(v, 64, "a view's signature")


class SealedReveal(_Wire):
    """A member's reveals of one round (``secagg.pack_reveal``), sealed with AES-GCM for the aggregator alone."""

    round: int = Field(ge=0)
    epoch_hash: str
    sealed: str

    _check_hash = field_validator("epoch_hash")(_hash)


class SecureAnswers(_Wire):
    """A member's answers to its inbox: its signed views and sealed reveals of recent rounds, rewritten when it has new
    ones. MAC'd for the aggregator, which alone may read it."""

    schema_version: Literal[2] = 2
    kind: Literal["cpu_tracker.secure_answers"] = ANSWERS_KIND
    email: str
    created_at: AwareDatetime
    views: list[SignedView] = Field(default_factory=list, max_length=16)
    reveals: list[SealedReveal] = Field(default_factory=list, max_length=16)
    mac: str = ""

    _check_email = field_validator("email")(_email)


class InboxRound(_Wire):
    """What one member is told about one closed round: its own status, its neighbours' (a bitmap over its neighbour
    order), the survivor count, the shares its surviving neighbours sealed for it, and, once they signed them, their
    views. Nothing about members that are not its neighbours."""

    round: int = Field(ge=0)
    epoch_hash: str
    status: Literal["unmasking", "refused"]
    survived: bool = False
    survivors: int = Field(default=0, ge=0)
    statuses: str = Field(default="", description="Neighbours' statuses, one bit each in neighbour order.")
    sealed: str = Field(default="", description="For each surviving neighbour in order, the 32-byte share it sealed "
                        "for this member (base64 of their concatenation).")
    views: str = Field(default="", description="Surviving neighbours' signed views (secagg.pack_views), base64.")
    reason: str | None = Field(default=None, description="Why a round was refused (names no member).")

    _check_hash = field_validator("epoch_hash")(_hash)


class Inbox(_Wire):
    """The aggregator's word to one member about the rounds it is unmasking. MAC'd; readable by that member only."""

    schema_version: Literal[2] = 2
    kind: Literal["cpu_tracker.secure_inbox"] = INBOX_KIND
    member: str
    created_at: AwareDatetime
    rounds: list[InboxRound] = Field(default_factory=list, max_length=8)
    mac: str = ""


# the fixed parts of ``inbox_file``'s JSON, taken from the models once (their version, kind and status words)
_INBOX_HEAD = b'{"schema_version":%d,"kind":%s,"member":' % (Inbox.model_fields["schema_version"].default,
                                                              to_json(Inbox.model_fields["kind"].default))
_STATUS_JSON = {s: to_json(s) for s in get_args(InboxRound.model_fields["status"].annotation)}


def inbox_round(*, round: int, epoch_hash: str, status: Literal["unmasking", "refused"], survived: bool = False,
                survivors: int = 0, statuses: bytes = b"", sealed: bytes = b"", views: bytes = b"",
                reason: str | None = None) -> bytes:
    """One ``InboxRound`` (its fields, the bitmaps and blocks as raw bytes) as the JSON ``inbox_file`` puts together:
    the aggregator writes 20,000 a round at 10,000 members, and joining bytes takes a third of the time pydantic's
    encoder takes from a dict of base64 text. The member reads it with the model (``read_mac(raw, Inbox, key)``);
    tests check that model and committed schema accept it and read back the same fields."""
    return b"".join((
        b'{"round":%d,"epoch_hash":' % round, to_json(epoch_hash), b',"status":', _STATUS_JSON[status],
        b',"survived":', b"true" if survived else b"false", b',"survivors":%d,"statuses":"' % survivors,
        binascii.b2a_base64(statuses, newline=False), b'","sealed":"', binascii.b2a_base64(sealed, newline=False),
        b'","views":"', binascii.b2a_base64(views, newline=False), b'","reason":',
        b"null" if reason is None else to_json(reason), b"}",
    ))


def inbox_file(member: str, created_at: datetime, rounds: list[bytes], key: bytes) -> bytes:
    """An ``Inbox`` file, MAC'd, from rounds encoded by ``inbox_round``."""
    body = b"".join((_INBOX_HEAD, to_json(member), b',"created_at":', to_json(created_at), b',"rounds":[',
                     b",".join(rounds), b"]}"))
    return _with_trailer(body, "mac", hmac.digest(key, message(INBOX_KIND, body), "sha256"))


class RoundOutcome(_Wire):
    round: int = Field(ge=0)
    status: Literal["unmasking", "published", "refused", "failed"]
    survivors: int = Field(ge=0)
    reason: str | None = Field(default=None, description="Names no member.")


class RoundOutcomes(_Wire):
    """The recent rounds' outcomes, for the cohort: every round the aggregator opened ends published, refused or
    failed. Signed by the aggregator; no member email."""

    schema_version: Literal[2] = 2
    kind: Literal["cpu_tracker.secure_rounds"] = ROUNDS_KIND
    aggregator: str
    epoch: int = Field(ge=1)
    epoch_hash: str
    created_at: AwareDatetime
    rounds: list[RoundOutcome] = Field(default_factory=list, max_length=64)
    signature: str = ""

    _check_hash = field_validator("epoch_hash")(_hash)


# ---------------------------------------------------------------------------------------------------
# The rules both roles apply to an epoch's parameters (one place)
# ---------------------------------------------------------------------------------------------------


def release_seconds(unit: str, interval_s: float) -> float:
    """A round's length: the measurement window itself, except for ``cpu_day``, whose whole day is the unit whatever
    the number of releases: the smallest whole number of windows that lasts at least 5 minutes (288 releases a day
    at 20 s windows instead of 4,320). The member keeps measuring every window; a round releases their mean."""
    if unit != DAY_UNIT:
        return float(interval_s)
    return math.ceil(DAY_RELEASE_S / interval_s - 1e-9) * float(interval_s)


def mean_sensitivity_for(unit: str, scale: int, units_per_window: int) -> int:
    """L1 sensitivity of the quantized mean coordinate for ``unit``: a member's whole window (or day) moves it by up
    to the full range, 100 * scale; one second of activity by 100 * scale / n for n whole seconds, rounded up.
    Stochastic rounding adds at most one integer step either way, which the + 1 covers for the per-second unit."""
    full = int(round((CPU_BOUNDS[1] - CPU_BOUNDS[0]) * scale))
    if unit == SECOND_UNIT:
        return min(full, math.ceil(full / units_per_window) + 1)
    return full


def releases_for(unit: str, window_s: float) -> int:
    """Releases one unit of protection must cover: the rounds that touch one UTC day for ``cpu_day`` (rounds are
    aligned to UTC multiples of ``window_s``), else one."""
    if unit != DAY_UNIT:
        return 1
    whole = DAY_S / window_s
    return math.ceil(whole - 1e-9) + (0 if abs(whole - round(whole)) < 1e-9 else 1)


def noise_family_for(unit: str) -> str:
    """Pure epsilon per window or per second: the distributed discrete Laplace. A day of releases composes far more
    cheaply in zCDP: the distributed discrete Gaussian (figures in docs/secure-mode.md's table)."""
    return "dgaussian" if unit == DAY_UNIT else "dlaplace"
