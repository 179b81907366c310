"""Settings: one typed model, read from a TOML file in the app folder and from environment variables.

Precedence (last wins): defaults < ``cpu_tracker.toml`` in the app folder < ``SYFTBOX_CPU_TRACKER_<NAME>``
< ``CPU_TRACKER_<NAME>``. SyftBox's scheduler passes only ``SYFTBOX_*`` variables to an app, so a real
install is configured through the file; plain variables serve manual runs and tests.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.atomic import read_regular
from shared.paths import SETTINGS_FILE, datasite_email_problem
from shared.privacy import (DAY_S, DAY_UNIT, SECOND_UNIT, WINDOW_UNIT, Budget, SecureUnit, budget_words, duration_words,
                            units_per_window, window_noise_scale)

ENV_PREFIXES = ("SYFTBOX_CPU_TRACKER_", "CPU_TRACKER_")
NOT_SETTINGS = {"env_root"}  # CPU_TRACKER_ENV_ROOT: where run.sh keeps the environments, read by run.sh alone
MAX_SETTINGS_BYTES = 1 << 20
MAX_MEMBERS_FILE_BYTES = 64 << 20  # about 2.5 million emails


# In the fixed unit (epsilon per second of activity). Default release: 5 per 20 s window, back to back, so any
# instant is touched by 1 window (5), an hour by 181 (905), a day by 4,321 (21,605): the defaults never pause,
# and leave room for the old ledger lines converted at 11x (0.5 per 0.1 s sample -> 5.5 per second: 995.5 an
# hour, 23,765.5 a day) when a member upgrades mid-span.
DEFAULT_BUDGETS = (
    Budget(horizon_s=0, epsilon=10.0),
    Budget(horizon_s=3600, epsilon=1000.0),
    Budget(horizon_s=86400, epsilon=24000.0),
)


# The private alerts' cap (shared/privacy/safezone.py: cap_check), in the same unit. A default monitor (epsilon 20 for
# one 20 s window mean, b = 4) costs at most 1 per second of activity over its whole lifetime, on any instant and on any
# day: the cap admits two of them at once (and four lifetimes a day) and nothing an aggregator asks beyond.
DEFAULT_MONITOR_BUDGETS = (Budget(horizon_s=0, epsilon=2.0), Budget(horizon_s=86400, epsilon=4.0))


SECURE_EPSILON_DEFAULTS = {SECOND_UNIT: 5.0, WINDOW_UNIT: 1.25, DAY_UNIT: 10.0}


class Settings(BaseModel):
    """Everything a user can set. Unknown keys are refused so that typos surface at once."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    aggregator: str | None = Field(
        default=None, description="Email of the aggregator datasite: the only one allowed to read reports."
    )
    role: Literal["auto", "member", "aggregator", "both"] = Field(
        default="auto",
        description="auto: member everywhere, plus aggregator where this datasite's email is `aggregator`.",
    )
    epsilon: float = Field(
        default=5.0, gt=0, le=10, description="Epsilon per release, for one second of CPU activity (the fixed unit)."
    )
    interval_s: float = Field(default=20.0, ge=1, le=3600, description="Release interval (seconds).")
    sample_period_s: float | None = Field(
        default=None, ge=0.01, le=60,
        description="Deprecated, ignored: privacy is accounted per second of activity whatever it says.",
    )
    budgets: tuple[Budget, ...] = Field(
        default=DEFAULT_BUDGETS, description="Rolling budgets; a release that would exceed one is skipped."
    )
    tick_s: float = Field(default=10.0, ge=0.5, le=3600, description="Aggregator polling period (seconds).")
    stale_after_s: float = Field(
        default=60.0, gt=0, le=DAY_S, description="A member is stale once no new report from it was seen for this long."
    )
    future_tolerance_s: float = Field(
        default=300.0, ge=0, le=DAY_S, description="How far in the future a report's time may lie (clock skew)."
    )
    min_members: int = Field(default=3, ge=1, le=10**6, description="Fewest fresh members for a network figure.")
    max_report_bytes: int = Field(
        default=16384, ge=1024, le=2**24, description="Reports larger than this are rejected."
    )
    max_epsilon: float = Field(default=10.0, gt=0, le=1000, description="Reports claiming more epsilon are rejected.")
    max_noise_scale: float = Field(
        default=10.0,
        gt=0,
        le=100,
        description="Reports with a larger Laplace scale (points) are rejected; bounds one member's influence "
        "on the network mean to (100 + 30 * max_noise_scale) / members.",
    )
    history_points: int = Field(default=8640, ge=10, description="Full-resolution history points kept.")
    metrics_port: int | None = Field(
        default=None, ge=1024, le=65535,
        description="Serve the Prometheus metrics on http://127.0.0.1:<port>/metrics (when the SyftBox client "
        "gives the app no SYFTBOX_APP_PORT); unset: the textfile only.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="info: problems, recoveries, starts and stops, an hourly summary (about 10 KB a day); "
        "debug adds a line per window and per tick.",
    )

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.aggregator is None and self.role != "aggregator":
            raise ValueError(
                f'The aggregator is not set: add `aggregator = "agg@example.org"` to {SETTINGS_FILE} in the app folder'
            )
        if self.aggregator is not None and (why := datasite_email_problem(self.aggregator)):
            raise ValueError(
                f"The aggregator must be one exact datasite email such as agg@example.org, got {self.aggregator!r}: "
                f"{why} (it is the only datasite allowed to read your report, so it must name exactly one)"
            )
        if not self.budgets:
            raise ValueError(
                "An empty list of budgets (budgets = []) would remove every limit on the privacy spent, even the "
                "check that no moment of activity is released twice; keep at least one, e.g. "
                "budgets = [{horizon_s = 0, epsilon = 10.0}]"
            )
        if self.history_points > 10**6:
            raise ValueError(f"history_points = {self.history_points} is too many: at most 1000000 are kept")
        return self

    @property
    def secure_target(self) -> float:
        """Secure mode's epsilon per unit: the setting, else the unit's default."""
        return self.secure_epsilon if self.secure_epsilon is not None else SECURE_EPSILON_DEFAULTS[self.secure_unit]

    @property
    def samples_per_window(self) -> int:
        """Units (whole seconds of activity) a window averages: its sensitivity is 100 / this."""
        return units_per_window(self.interval_s)

    def roles(self, email: str, forced: str | None = None) -> frozenset[str]:
        """The roles datasite ``email`` runs: ``forced`` (a command-line override) or the ``role`` setting;
        ``auto`` is the member everywhere, plus the aggregator on the datasite named by ``aggregator``."""
        role = forced or self.role
        if role == "both":
            return frozenset({"member", "aggregator"})
        if role != "auto":
            return frozenset({role})
        return frozenset({"member", "aggregator"} if email == self.aggregator else {"member"})

    members: tuple[str, ...] | None = Field(
        default=None,
        description="Aggregator: the only datasites whose reports count (emails); others are counted as not_member. "
        "Unset (and no members_file): every datasite counts.",
    )
    members_file: str | None = Field(
        default=None,
        description="Aggregator: a file of member emails, one per line, # starts a comment; a relative path is read "
        "from the app folder (the working directory the app runs in). Adds to `members`.",
    )

    # -- secure aggregation (issue 10): members take part in the aggregator's epochs, the aggregator runs them ----
    mode: Literal["local", "secure"] = Field(
        default="local",
        description="Member: local publishes a Laplace-noised mean for the aggregator; secure takes part in the "
        "aggregator's secure rounds instead (the aggregator then learns only the noisy sum of the cohort).",
    )
    secure_unit: SecureUnit = Field(
        default=WINDOW_UNIT,
        description="What secure mode's epsilon protects: one second of activity, a member's whole window, or its "
        "whole UTC day. Member: the weakest unit it accepts; aggregator: the unit its epochs use.",
    )
    secure_epsilon: float | None = Field(
        default=None, gt=0, le=100,
        description="Epsilon per unit in secure mode, mean and histogram together (80 % / 20 %). Member: the most it "
        "accepts from an epoch; aggregator: what its epochs target. Unset: 5 per second, 1.25 per window (1 for the "
        "mean, 0.25 for the histogram), 10 per UTC day.",
    )
    secure_delta: float = Field(
        default=1e-6, ge=0, le=1e-3,
        description="Delta of the cpu_day unit (the distributed discrete Gaussian); the other units are pure (0).",
    )
    min_cohort: int = Field(
        default=3, ge=3, le=10**6,
        description="Secure mode: fewest members in an epoch and survivors in a round (member: it refuses smaller).",
    )
    min_survivor_fraction: float = Field(
        default=0.8, gt=0, le=1,
        description="Aggregator: a round needs this share of the cohort (and at least min_cohort). Member: the least "
        "share of survivors it accepts from an epoch.",
    )
    secure_bins: int = Field(default=20, ge=2, le=100, description="Histogram bins over [0, 100] (fleet percentiles).")

    @model_validator(mode="after")
    def _check_members(self) -> "Settings":
        if self.members_file is not None:
            path = Path(self.members_file)
            try:  # never blocks on a FIFO, refuses a device or folder
                raw = read_regular(path, MAX_MEMBERS_FILE_BYTES + 1, follow=True)
                if len(raw) > MAX_MEMBERS_FILE_BYTES:
                    raise ValueError(f"it is larger than {MAX_MEMBERS_FILE_BYTES >> 20} MiB")
                lines = raw.decode("utf-8").splitlines()
            except (OSError, ValueError) as e:  # UnicodeDecodeError, an embedded NUL in the path: ValueErrors
                raise ValueError(f"members_file {str(path.absolute())!r} cannot be read ({e}): create it (one email "
                                 f"per line) or remove the setting") from None
            listed = [x.split("#", 1)[0].strip() for x in lines]
            object.__setattr__(self, "members", (*(self.members or ()), *(x for x in listed if x)))
        from shared.paths import is_datasite_email  # shared.paths needs no settings: no cycle

        bad = [m for m in self.members or () if not is_datasite_email(m)]
        if bad:
            raise ValueError(f"members must be datasite emails, got {bad[:3]!r}"
                             + (f" (from members_file {self.members_file!r})" if self.members_file else ""))
        return self

    # -- private alerts (safe zones): shared/privacy/safezone.py, cpu_tracker_member/monitor.py, .../alerts.py
    monitors: tuple[Any, ...] = Field(
        default=(), description="Aggregator: the private alerts it runs, [[monitors]] tables (name, kind, threshold, "
        "margin, window, epsilon, violations, lifetime_days); none by default: each costs every member budget. Each "
        "table is checked on its own (shared.privacy.safezone.parse_monitors): a bad one is refused in the log, the "
        "rest run.")
    join_monitors: bool = Field(
        default=True, description="Member: take part in the aggregator's monitors (each spend is charged to the "
        "ledger first, like a release).")
    monitor_budgets: tuple[Budget, ...] = Field(
        default=DEFAULT_MONITOR_BUDGETS, description="Member: the cap on all private alerts together, whatever their "
        "names and generations (rolling budgets in the ledger's unit, one second of activity, checked by the ledger "
        "under its lock; each vector and each safe zone counted once). Default: 2 on any instant (two default "
        "monitors' whole lifetimes) and 4 on any day. A spend over it is skipped and the member stays silent.")

    @model_validator(mode="after")
    def _check_monitor_budgets(self) -> "Settings":
        if not self.monitor_budgets:
            raise ValueError("An empty monitor_budgets would let an aggregator make this member spend without limit "
                             "on private alerts; keep at least one, e.g. monitor_budgets = [{horizon_s = 0, "
                             "epsilon = 2.0}], or set join_monitors = false to take part in none")
        return self


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it and says what to do."""


def load_settings(app_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``app_dir/cpu_tracker.toml`` and ``environ``. Raises SettingsError naming the culprit."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    path = Path(app_dir or Path.cwd()) / SETTINGS_FILE
    try:  # never blocks on a FIFO, refuses a device or folder
        raw = read_regular(path, MAX_SETTINGS_BYTES + 1, follow=True)
    except FileNotFoundError:
        raw = None
    except OSError as e:
        raise SettingsError(f"cannot read {path}: {e.strerror or e}. Fix the file or remove it to use the "
                            "defaults.") from None
    if raw is not None:
        values.update(_parse_toml(path, raw))
    names = set(Settings.model_fields)
    for prefix in ENV_PREFIXES:
        for key, raw in environ.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :].lower()
            if name in NOT_SETTINGS:
                continue
            if name not in names:
                raise SettingsError(f"unknown setting {key}; known: {', '.join(sorted(names))}")
            values[name] = _parse_env(name, raw)
    try:
        if (odd := _odd_value(values)) is not None:
            problems = f"{odd}."
        else:
            return Settings.model_validate(values)
    except ValidationError as e:
        problems = " ".join(_sentence(err) for err in e.errors())
    except (RecursionError, ValueError, TypeError, OverflowError) as e:  # what a validator may raise on odd input
        problems = f"A value cannot be understood ({type(e).__name__}: {str(e)[:200]})."
    raise SettingsError(
        f"The settings in {path} (or the CPU_TRACKER_* variables) are not valid, so the app does not start. {problems}"
    )


def _parse_toml(path: Path, raw: bytes) -> dict:
    """The settings file's table, or a SettingsError in one sentence (never another exception: the parser raises
    RecursionError for deep nesting and ValueError for an integer of more than 4,300 digits)."""
    if len(raw) > MAX_SETTINGS_BYTES:
        raise SettingsError(f"cannot read {path}: it is larger than {MAX_SETTINGS_BYTES >> 10} KiB, far more than any "
                            "settings file needs. Fix the file or remove it to use the defaults.")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        why = str(e)
    except RecursionError:
        why = "it nests arrays or tables too deeply"
    except ValueError as e:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        why = f"a value cannot be read ({str(e)[:200]})"
    raise SettingsError(f"cannot read {path}: {why}. Fix the file or remove it to use the defaults.")


MAX_DEPTH = 16  # the deepest setting (monitors: a list of tables of numbers) nests 3 deep
INT64 = 1 << 63


def _odd_value(value, where: str = "", depth: int = 0) -> str | None:
    """Why a parsed value cannot be a setting whatever its key (None: it may be): nested more than MAX_DEPTH deep,
    or an integer outside TOML's 64-bit range (tomllib reads ``0x`` followed by thousands of digits, whose repr alone
    raises). Iterative over siblings, recursive only MAX_DEPTH deep."""
    if depth > MAX_DEPTH:
        return f"{where or 'a value'} nests more than {MAX_DEPTH} arrays or tables deep"
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not -INT64 <= value < INT64:
        return f"{where or 'a value'} is an integer beyond the 64-bit range TOML allows"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{_printable(key)}".lstrip(".")
        if (why := _odd_value(item, name[:200], depth + 1)) is not None:
            return why
    return None


def _printable(text: str) -> str:
    """``text`` for a one-line message: anything not printable (a newline in a quoted TOML key) shown escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _sentence(err: dict) -> str:
    """One pydantic error as a sentence for a person: the setting, the value given, what it must be."""
    msg = str(err.get("msg", "is not valid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{_printable(str(p))}" for p in err.get("loc", ())).lstrip(".")
    if not loc:  # a rule about several settings: its message is already a sentence
        return msg.rstrip(".") + "."
    if err.get("type") == "extra_forbidden":
        return f"{loc} is not a setting (known: {', '.join(sorted(Settings.model_fields))})."
    if err.get("type") == "missing":
        return f"{loc} is missing."
    if msg.startswith("Input should be"):
        msg = "it should be" + msg[len("Input should be"):]
    return f"{loc} = {_shown(err.get('input'))} is not accepted: {msg.rstrip('.')}."


def _shown(value) -> str:
    try:
        text = json.dumps(value, default=str) if not isinstance(value, float) else f"{value:g}"
    except (ValueError, RecursionError):  # an integer of more than 4,300 digits, nesting thousands deep
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------
# What the settings will do, said before they do it
# ---------------------------------------------------------------------------------------------------
def windows_touching(horizon_s: float, interval_s: float) -> int:
    """Most back-to-back windows of ``interval_s`` seconds (half-open) that a closed span of ``horizon_s`` touches."""
    return math.floor(horizon_s / interval_s + 1e-9) + 1


def settings_warnings(settings: Settings) -> list[str]:
    """Sentences for a person about what these settings guarantee will happen: budgets that will pause releases
    (and how far into each span), a noise scale the default aggregator rejects, an ignored setting. Pure: the
    caller logs them (once per settings load). Empty for the default settings."""
    out: list[str] = []
    w = settings.interval_s
    eps = settings.epsilon  # local mode: epsilon per release; secure mode: the epoch's, at most secure_target
    if settings.mode == "secure":
        if settings.secure_unit == DAY_UNIT:  # its own daily check; each release's share of it is small
            return out
        eps = settings.secure_target
    if settings.sample_period_s is not None:
        out.append(
            f"sample_period_s = {settings.sample_period_s:g} is ignored and no longer changes the privacy: every "
            "release is now accounted per second of CPU activity, whatever the sample period. Remove the line from "
            f"{SETTINGS_FILE}."
        )
    for b in settings.budgets:
        touched = windows_touching(b.horizon_s, w)
        if eps > b.epsilon * (1 + 1e-9):
            out.append(
                f"Nothing will ever be published: each release spends epsilon {eps:g}, more than the budget of "
                f"{budget_words(b)}. Lower epsilon to {b.epsilon:g} or less, or raise that budget."
            )
        elif touched * eps > b.epsilon * (1 + 1e-9):
            fits = math.floor(b.epsilon / eps * (1 + 1e-9))
            span = duration_words(b.horizon_s)
            out.append(
                f"Releases will pause for part of every span of {span}: at epsilon {eps:g} per release every "
                f"{duration_words(w)}, the budget of {budget_words(b)} is used up about {duration_words(fits * w)} "
                f"({fits} releases) into each such span, and nothing is published for the rest of it. To publish "
                f"all the time, lower epsilon to {b.epsilon / touched:.3g} or raise that budget to {touched * eps:g}."
            )
    scale = window_noise_scale(settings.samples_per_window, eps)
    if settings.mode == "local" and scale > settings.max_noise_scale:
        out.append(
            f"Every report will be rejected by an aggregator with max_noise_scale {settings.max_noise_scale:g}: its "
            f"noise scale is {scale:.3g} points (100 / {settings.samples_per_window} whole seconds / epsilon {eps:g}). "
            "Raise interval_s or epsilon."
        )
    return out


def _parse_env(name: str, raw: str):
    if name in ("budgets", "monitors", "monitor_budgets"):
        try:
            value = json.loads(raw)
            why = _odd_value(value, name)
        except RecursionError:
            why = "it nests too deeply"
        except ValueError as e:  # JSONDecodeError, or an integer of more than 4,300 digits
            why = str(e)[:200]
        if why is not None:
            raise SettingsError(f"{name} must be JSON, e.g. '[{{\"horizon_s\": 3600, \"epsilon\": 100}}]': {why}")
        return value
    return raw
