"""Settings: one typed model, read from a TOML file in the app folder and from environment variables.

Precedence (last wins): defaults < ``cpu_tracker.toml`` in the app folder < ``SYFTBOX_CPU_TRACKER_<NAME>``
< ``CPU_TRACKER_<NAME>``. SyftBox's scheduler passes only ``SYFTBOX_*`` variables to an app, so a real
install is configured through the file; plain variables serve manual runs and tests.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SETTINGS_FILE = "cpu_tracker.toml"
ENV_PREFIXES = ("SYFTBOX_CPU_TRACKER_", "CPU_TRACKER_")


class Budget(BaseModel):
    """A rolling privacy budget: the epsilon summed over every release whose window touches any span of
    ``horizon_s`` seconds never exceeds ``epsilon`` (for the declared unit, one CPU sample)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    horizon_s: float = Field(ge=0, description="Length of the rolling span in seconds (0: one instant).")
    epsilon: float = Field(gt=0, description="Most epsilon all releases touching such a span may spend.")


DEFAULT_BUDGETS = (
    Budget(horizon_s=0, epsilon=1.0),
    Budget(horizon_s=3600, epsilon=100.0),
    Budget(horizon_s=86400, epsilon=2200.0),
)


class Settings(BaseModel):
    """Everything a user can set. Unknown keys are refused so that typos surface at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aggregator: str | None = Field(
        default=None, description="Email of the aggregator datasite: the only one allowed to read reports."
    )
    role: Literal["auto", "member", "aggregator", "both"] = Field(
        default="auto",
        description="auto: member everywhere, plus aggregator where this datasite's email is `aggregator`.",
    )
    epsilon: float = Field(default=0.5, gt=0, le=10, description="Epsilon per release, for one CPU sample.")
    interval_s: float = Field(default=20.0, ge=1, le=3600, description="Release interval (seconds).")
    sample_period_s: float = Field(default=0.1, ge=0.01, le=60, description="Seconds between CPU samples.")
    budgets: tuple[Budget, ...] = Field(
        default=DEFAULT_BUDGETS, description="Rolling budgets; a release that would exceed one is skipped."
    )
    tick_s: float = Field(default=10.0, ge=0.5, le=3600, description="Aggregator polling period (seconds).")
    stale_after_s: float = Field(
        default=60.0, gt=0, description="A member is stale once no new report from it was seen for this long."
    )
    future_tolerance_s: float = Field(
        default=300.0, ge=0, description="How far in the future a report's time may lie (clock skew)."
    )
    min_members: int = Field(default=3, ge=1, description="Fewest fresh members for a network figure.")
    max_report_bytes: int = Field(default=16384, ge=1024, description="Reports larger than this are rejected.")
    max_epsilon: float = Field(default=10.0, gt=0, description="Reports claiming more epsilon are rejected.")
    max_noise_scale: float = Field(
        default=10.0,
        gt=0,
        description="Reports with a larger Laplace scale (points) are rejected; bounds one member's influence "
        "on the network mean to (100 + 30 * max_noise_scale) / members.",
    )
    history_points: int = Field(default=8640, ge=10, description="Full-resolution history points kept.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="info: problems, recoveries, starts and stops, an hourly summary (about 10 KB a day); "
        "debug adds a line per window and per tick.",
    )

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.interval_s / self.sample_period_s < 2:
            raise ValueError("interval_s must hold at least 2 samples of sample_period_s")
        if self.aggregator is None and self.role != "aggregator":
            raise ValueError(
                f'aggregator is not set: add `aggregator = "agg@example.org"` to {SETTINGS_FILE} in the app folder'
            )
        if self.aggregator is not None and "@" not in self.aggregator:
            raise ValueError(f"aggregator must be an email, got {self.aggregator!r}")
        return self

    @property
    def samples_per_window(self) -> int:
        return round(self.interval_s / self.sample_period_s)

    def roles(self, email: str, forced: str | None = None) -> frozenset[str]:
        """The roles datasite ``email`` runs: ``forced`` (a command-line override) or the ``role`` setting;
        ``auto`` is the member everywhere, plus the aggregator on the datasite named by ``aggregator``."""
        role = forced or self.role
        if role == "both":
            return frozenset({"member", "aggregator"})
        if role != "auto":
            return frozenset({role})
        return frozenset({"member", "aggregator"} if email == self.aggregator else {"member"})


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it and says what to do."""


def load_settings(app_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``app_dir/cpu_tracker.toml`` and ``environ``. Raises SettingsError naming the culprit."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    path = Path(app_dir or Path.cwd()) / SETTINGS_FILE
    if path.exists():
        try:
            values.update(tomllib.loads(path.read_text("utf-8")))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise SettingsError(f"cannot read {path}: {e}. Fix the file or remove it to use the defaults.") from e
    names = set(Settings.model_fields)
    for prefix in ENV_PREFIXES:
        for key, raw in environ.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :].lower()
            if name not in names:
                raise SettingsError(f"unknown setting {key}; known: {', '.join(sorted(names))}")
            values[name] = _parse_env(name, raw)
    try:
        return Settings.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in e.errors()
        )
        raise SettingsError(f"invalid settings ({path} and CPU_TRACKER_* variables): {problems}") from e


def _parse_env(name: str, raw: str):
    if name == "budgets":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise SettingsError(
                f"{name} must be JSON, e.g. '[{{\"horizon_s\": 3600, \"epsilon\": 100}}]': {e}"
            ) from e
    return raw
