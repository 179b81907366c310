"""Checking one member's report file. Pure: bytes and the time in, an accepted report or a reason out.

Every way a file can be wrong has a named reason (``REASONS``); the aggregator counts them and never lets
one bad file stop a tick.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import ValidationError

from shared.schema import SCHEMA_VERSION, LegacyReport, MemberReport, to_utc
from shared.settings import Settings

REASONS = {
    "too_large": "file larger than the size cap",
    "not_utf8": "not UTF-8 text",
    "not_json": "not JSON (empty, truncated or garbled)",
    "duplicate_keys": "a key appears twice",
    "non_finite": "NaN or Infinity",
    "too_deep": "nested too deeply",
    "not_an_object": "JSON but not an object",
    "schema_version": "unsupported schema_version",
    "schema": "fields missing or of the wrong type",
    "inconsistent": "privacy parameters do not agree with each other",
    "epsilon_out_of_range": "epsilon above the accepted maximum",
    "noise_out_of_range": "noise scale above the accepted maximum",
    "implausible_value": "value impossible for its own noise scale",
    "future": "time too far in the future",
    "symlink": "report is a symlink or lies outside the member's folder",
    "not_a_file": "report path is not a regular file",
    "bad_folder_name": "datasite folder name is not an email",
    "unreadable": "file could not be read",
}
PLAUSIBLE_SCALES = 30.0  # |noise| > 30 b has probability e^-30 ~ 1e-13 for honest Laplace noise
EMAIL = re.compile(r"^[^@/\\\s]+@[^@/\\\s]+$")


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail or REASONS[reason]}")
        self.reason, self.detail = reason, detail or REASONS[reason]


@dataclass(frozen=True)
class Accepted:
    kind: Literal["report", "legacy"]
    report: MemberReport | LegacyReport
    created_at: datetime
    window_end: datetime

    def is_fresh(self, now: datetime, stale_after_s: float) -> bool:
        return (now - self.window_end).total_seconds() <= stale_after_s


def check_member_name(name: str) -> None:
    if not EMAIL.match(name):
        raise Rejected("bad_folder_name", f"folder {name!r} is not an email")


def parse_report(data: bytes, *, now: datetime, settings: Settings) -> Accepted:
    """Validate one report file's bytes. Raises Rejected with the reason."""
    if len(data) > settings.max_report_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > {settings.max_report_bytes}")
    obj = _load_json(data)
    if not isinstance(obj, dict):
        raise Rejected("not_an_object", f"top level is {type(obj).__name__}")
    if "schema_version" in obj:
        if type(obj["schema_version"]) is not int or obj["schema_version"] != SCHEMA_VERSION:
            raise Rejected("schema_version", f"schema_version {obj.get('schema_version')!r}, supported: {SCHEMA_VERSION}")
        report = _model(MemberReport, obj)
        _check_consistent(report, settings)
        accepted = Accepted("report", report, report.created_at, report.window.end)
    elif {"cpu", "timestamp"} <= obj.keys():
        legacy = _model(LegacyReport, obj)
        if not 0.0 <= legacy.cpu <= 100.0:  # the tutorial clamps its noisy mean into the bounds
            raise Rejected("implausible_value", f"legacy cpu {legacy.cpu} outside [0, 100]")
        accepted = Accepted("legacy", legacy, legacy.created_at, legacy.created_at)
    else:
        raise Rejected("schema", "neither a member report nor a tutorial report (no schema_version, cpu, timestamp)")
    if accepted.window_end - now > timedelta(seconds=settings.future_tolerance_s):
        raise Rejected("future", f"time {accepted.window_end.isoformat()} is ahead of {now.isoformat()}")
    return accepted


def _load_json(data: bytes):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("not_utf8", str(e)) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite)
    except Rejected:
        raise
    except RecursionError:
        raise Rejected("too_deep") from None
    except ValueError as e:
        raise Rejected("not_json", str(e)) from None


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise Rejected("duplicate_keys", f"key {k!r} appears twice")
        obj[k] = v
    return obj


def _no_constants(name: str):
    raise Rejected("non_finite", f"{name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected("non_finite", f"{text[:40]} overflows")
    return value


def _model(model, obj: dict):
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Rejected("schema", f"{where}: {first['msg']}") from None
    except (OverflowError, ValueError) as e:
        raise Rejected("schema", str(e)) from None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _check_consistent(r: MemberReport, settings: Settings) -> None:
    """The report's own privacy numbers must agree: otherwise its declared noise cannot be trusted."""
    rel, w = r.release, r.window
    lo, hi = r.bounds
    if (lo, hi) != (0.0, 100.0):
        raise Rejected("inconsistent", f"bounds {r.bounds} are not (0, 100)")
    if w.n_samples * w.sample_period_s > 1.5 * w.seconds + 1.0:
        raise Rejected("inconsistent", f"{w.n_samples} samples of {w.sample_period_s} s cannot fit in {w.seconds:.1f} s")
    if not _close(rel.sensitivity, (hi - lo) / w.n_samples):
        raise Rejected("inconsistent", f"sensitivity {rel.sensitivity} != (upper - lower) / n_samples")
    if not _close(rel.noise_scale, rel.sensitivity / rel.epsilon):
        raise Rejected("inconsistent", f"noise_scale {rel.noise_scale} != sensitivity / epsilon")
    if not _close(rel.noise_std, math.sqrt(2) * rel.noise_scale):
        raise Rejected("inconsistent", f"noise_std {rel.noise_std} != sqrt(2) * noise_scale")
    if rel.epsilon > settings.max_epsilon:
        raise Rejected("epsilon_out_of_range", f"epsilon {rel.epsilon} > {settings.max_epsilon}")
    if rel.noise_scale > settings.max_noise_scale:
        raise Rejected("noise_out_of_range", f"noise scale {rel.noise_scale} > {settings.max_noise_scale}")
    margin = PLAUSIBLE_SCALES * rel.noise_scale
    if not lo - margin <= rel.value <= hi + margin:
        raise Rejected("implausible_value", f"value {rel.value} outside [{lo - margin:.4g}, {hi + margin:.4g}]")
    if r.cpu is not None and not _close(r.cpu, rel.value):
        raise Rejected("inconsistent", "legacy key cpu differs from release.value")
