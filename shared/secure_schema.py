"""Wire formats of secure aggregation: the member's public key, the aggregator's epoch, a member's round upload,
the aggregator's per-member inbox, and the secure figure on the dashboard. Same compatibility contract as
``shared.schema``: fields are never removed or renamed, new ones are optional, ``schema_version`` changes only
with a breaking change. Layout on SyftBox (``shared.paths``):

- ``<member>/app_data/cpu_tracker/secure_key.json``   ``SecureKey``, the aggregator only: the X25519 public key.
- ``<aggregator>/app_data/cpu_tracker_epoch/epoch.json``   ``Epoch``, the cohort only: members, keys, graph, parameters.
- ``<member>/app_data/cpu_tracker/secure/r<round>.json``   ``SecureUpload``, the aggregator only.
- ``<aggregator>/app_data/cpu_tracker/inbox/<member>/inbox.json``   ``Inbox``, that member only.
"""

from __future__ import annotations

import base64
import math
from typing import Literal

from pydantic import AwareDatetime, Field, field_validator, model_validator

from shared.paths import is_datasite_email
from shared.schema import CPU_BOUNDS, _Wire
from shared.secagg import MODULUS_BITS, is_symmetric, shamir_threshold
from shared.secnoise import NoiseSpec

KEY_KIND = "cpu_tracker.secure_key"
EPOCH_KIND = "cpu_tracker.secure_epoch"
UPLOAD_KIND = "cpu_tracker.secure_round"
INBOX_KIND = "cpu_tracker.secure_inbox"
Unit = Literal["cpu_second", "cpu_window", "cpu_day"]
UNIT_WORDS = {
    "cpu_second": "one second of a member's CPU activity",
    "cpu_window": "a member's whole window",
    "cpu_day": "a member's whole UTC day",
}


def _b64(text: str, n: int, what: str) -> str:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"{what} must be base64") from None
    if len(raw) != n:
        raise ValueError(f"{what} must hold {n} bytes, got {len(raw)}")
    return text


def b64_bytes(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _email(v: str) -> str:
    if not is_datasite_email(v):
        raise ValueError(f"{v!r} is not a datasite email")
    return v


class CohortMember(_Wire):
    """A member and its X25519 public key (base64, 32 bytes)."""

    email: str
    x25519: str = Field(description="Raw X25519 public key, base64 (32 bytes).")

    _check_email = field_validator("email")(_email)

    @field_validator("x25519")
    @classmethod
    def _key(cls, v: str) -> str:
        return _b64(v, 32, "x25519")


class SecureKey(CohortMember):
    """A member's long-term public key, for the aggregator (the private key never leaves the machine's private
    folder); the aggregator copies it into the epoch as a ``CohortMember``."""

    schema_version: Literal[1] = 1
    kind: Literal["cpu_tracker.secure_key"] = KEY_KIND
    created_at: AwareDatetime


class Epoch(_Wire):
    """One cohort and its parameters, for rounds ``first_round`` .. ``first_round + rounds - 1``. Round r is the
    UTC window [r * window_s, (r + 1) * window_s) in Unix seconds. A member checks it before taking part
    (``cpu_tracker_member.secure.epoch_problem``)."""

    schema_version: Literal[1] = 1
    kind: Literal["cpu_tracker.secure_epoch"] = EPOCH_KIND
    epoch: int = Field(ge=1, description="Increases with every new epoch.")
    created_at: AwareDatetime
    aggregator: str
    salt: str = Field(description="Public random salt of the pairwise secrets (base64, 16 bytes).")
    window_s: float = Field(ge=1, le=86400)
    first_round: int = Field(ge=0)
    rounds: int = Field(ge=1, le=10**6, description="Rounds this epoch lasts; a new epoch follows it.")
    deadline_s: float = Field(gt=0, description="Uploads of round r count if seen by (r + 1) * window_s + this.")
    reveal_rounds: int = Field(ge=1, le=100, description="Rounds after r within which its unmasking must finish.")
    cohort: list[CohortMember] = Field(min_length=2)
    neighbours: dict[str, list[str]]
    threshold: int = Field(ge=1, description="Shamir shares that rebuild a self-mask seed.")
    min_survivors: int = Field(ge=2, description="Fewer survivors: the round is refused and nothing is revealed.")
    modulus_bits: Literal[64] = MODULUS_BITS
    scale: int = Field(ge=1, le=10**6, description="Integers per CPU point in the mean coordinate.")
    bins: int = Field(ge=1, le=1000, description="Equal histogram bins over [0, 100].")
    bounds: tuple[float, float] = CPU_BOUNDS
    units_per_window: int = Field(ge=1, description="Whole seconds a window averages (the cpu_second unit).")
    unit: Unit
    epsilon: float = Field(gt=0, description="Target epsilon per unit (per second, per window, or per UTC day).")
    delta: float = Field(ge=0, lt=1)
    noise: NoiseSpec

    _check_aggregator = field_validator("aggregator")(_email)

    @field_validator("salt")
    @classmethod
    def _salt(cls, v: str) -> str:
        return _b64(v, 16, "salt")

    @model_validator(mode="after")
    def _consistent(self) -> "Epoch":
        emails = [m.email for m in self.cohort]
        if len(set(emails)) != len(emails):
            raise ValueError("the cohort lists a member twice")
        if set(self.neighbours) != set(emails):
            raise ValueError("the neighbour graph must list exactly the cohort")
        if not is_symmetric(self.neighbours):
            raise ValueError("the neighbour graph must be symmetric and without self-loops")
        degrees = {len(p) for p in self.neighbours.values()}
        if min(degrees) < 1:
            raise ValueError("every member needs a neighbour")
        if any(self.threshold < shamir_threshold(d) for d in degrees) or self.threshold > min(degrees):
            raise ValueError(f"threshold {self.threshold} must exceed half of every member's neighbours and be at "
                             f"most the fewest neighbours ({min(degrees)})")
        if self.min_survivors > len(emails):
            raise ValueError("min_survivors exceeds the cohort")
        if self.noise.shares_for > self.min_survivors:
            raise ValueError("the noise must be complete with min_survivors shares (noise.shares_for <= min_survivors)")
        if self.bounds != CPU_BOUNDS:
            raise ValueError(f"bounds must be {CPU_BOUNDS}")
        return self

    @property
    def dim(self) -> int:
        return 1 + self.bins

    def emails(self) -> list[str]:
        return [m.email for m in self.cohort]

    def key_of(self, email: str) -> str | None:
        return next((m.x25519 for m in self.cohort if m.email == email), None)

    def window(self, round_: int) -> tuple[float, float]:
        return round_ * self.window_s, (round_ + 1) * self.window_s

    def last_round(self) -> int:
        return self.first_round + self.rounds - 1

    def bin_edges(self) -> list[float]:
        lo, hi = self.bounds
        return [lo + (hi - lo) * i / self.bins for i in range(self.bins + 1)]


class Reveal(_Wire):
    """What a member reveals for one earlier round, following that round's inbox: for each surviving neighbour
    its share of that neighbour's self-mask seed, for each dropped neighbour the pairwise round key; never both
    for one peer."""

    round: int = Field(ge=0)
    shares: dict[str, str] = Field(default_factory=dict, description="Survivor -> seed share (base64, 18 bytes).")
    keys: dict[str, str] = Field(default_factory=dict, description="Dropped neighbour -> round key (base64, 32 bytes).")

    @model_validator(mode="after")
    def _never_both(self) -> "Reveal":
        if set(self.shares) & set(self.keys):
            raise ValueError("a reveal names a peer both as survivor and as dropped")
        for v in self.shares.values():
            _b64(v, 18, "a seed share")
        for v in self.keys.values():
            _b64(v, 32, "a round key")
        return self


class SecureUpload(_Wire):
    """A member's round file: its masked vector, its self-mask seed's shares sealed for its neighbours, and its
    reveals for earlier rounds. Readable by the aggregator only; holds no unmasked value."""

    schema_version: Literal[1] = 1
    kind: Literal["cpu_tracker.secure_round"] = UPLOAD_KIND
    mode: Literal["secure"] = "secure"
    app_version: str
    email: str
    epoch: int = Field(ge=1)
    round: int = Field(ge=0)
    created_at: AwareDatetime
    vector: str = Field(description="The masked vector, little-endian uint64 words, base64.")
    sealed: dict[str, str] = Field(description="Neighbour -> AES-GCM-sealed share of this round's self-mask seed.")
    reveals: list[Reveal] = Field(default_factory=list, max_length=16)
    unit: Unit | None = Field(default=None, description="The privacy unit of this release (the epoch's).")
    epsilon: float | None = Field(default=None, ge=0, description="Epsilon of this release for `unit` with the "
                                  "epoch's fewest survivors, as the member's ledger charged it.")

    _check_email = field_validator("email")(_email)


class InboxRound(_Wire):
    round: int = Field(ge=0)
    epoch: int | None = Field(default=None, ge=1, description="The round's epoch (default: the inbox's).")
    status: Literal["unmasking", "refused"]
    survivors: list[str] = Field(default_factory=list)
    dropped: list[str] = Field(default_factory=list)
    sealed: dict[str, str] = Field(default_factory=dict, description="Surviving neighbour -> its sealed share for "
                                   "this member.")
    reason: str | None = None

    @model_validator(mode="after")
    def _disjoint(self) -> "InboxRound":
        if set(self.survivors) & set(self.dropped):
            raise ValueError("a member is listed both as survivor and as dropped")
        return self


class Inbox(_Wire):
    """The aggregator's word to one member about the rounds it is unmasking. Readable by that member only."""

    schema_version: Literal[1] = 1
    kind: Literal["cpu_tracker.secure_inbox"] = INBOX_KIND
    epoch: int = Field(ge=1)
    member: str
    rounds: list[InboxRound] = Field(default_factory=list, max_length=32)


# ---------------------------------------------------------------------------------------------------
# The rules both roles apply to an epoch's parameters (one place)
# ---------------------------------------------------------------------------------------------------
DAY_S = 86400


def mean_sensitivity_for(unit: str, scale: int, units_per_window: int) -> int:
    """L1 sensitivity of the quantized mean coordinate for ``unit``: a member's whole window (or day) moves it by up
    to the full range, 100 * scale; one second of activity by 100 * scale / n for n whole seconds, rounded up.
    Stochastic rounding adds at most one integer step either way, which the + 1 covers for the per-second unit."""
    full = int(round((CPU_BOUNDS[1] - CPU_BOUNDS[0]) * scale))
    if unit == "cpu_second":
        return min(full, math.ceil(full / units_per_window) + 1)
    return full


def releases_for(unit: str, window_s: float) -> int:
    """Releases one unit of protection must cover: the windows that touch one UTC day for ``cpu_day`` (windows are
    aligned to UTC multiples of ``window_s``), else one."""
    if unit != "cpu_day":
        return 1
    whole = DAY_S / window_s
    return math.ceil(whole - 1e-9) + (0 if abs(whole - round(whole)) < 1e-9 else 1)


def noise_family_for(unit: str) -> str:
    """Pure epsilon per window or per second: the distributed discrete Laplace. A day of releases composes far more
    cheaply in zCDP: the distributed discrete Gaussian (figures in docs/secure-mode.md's table)."""
    return "dgaussian" if unit == "cpu_day" else "dlaplace"
