"""Checking one member's report file. Pure: bytes and the time in, an accepted report or a reason out.

Every way a file can be wrong has a named reason (``REASONS``); the aggregator counts them and never lets
one bad file stop a tick.

Two paths, one verdict. The member app writes its report in one exact layout (``json.dumps(indent=2)`` of the
model); such a file is checked by one regular expression that pins every key, its order and each value's JSON
type (so no duplicate key, no NaN, no unknown field can hide in it), then by the same value checks the models
make. That costs a third of the general path. Any file the fast path is not sure of (another layout, an
escape in a string, a value out of range) goes through the general path (strict JSON, then the pydantic
models), which alone decides every rejection and its reason: the fast path only ever accepts.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta
from typing import Literal, NamedTuple

from pydantic import ValidationError

from shared.schema import CPU_BOUNDS, SCHEMA_VERSION, LaplaceRelease, LegacyReport, MemberReport, PrivacyUnit, Window
from shared.paths import is_datasite_email
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


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail or REASONS[reason]}")
        self.reason, self.detail = reason, detail or REASONS[reason]


class Accepted(NamedTuple):
    """A valid report, reduced to what the aggregator uses (a tuple: cheap to make and to keep). ``report``
    gives the full model on demand."""

    kind: Literal["report", "legacy"]
    created_at: datetime
    window_end: datetime
    value: float  # release.value (legacy: cpu)
    noise_scale: float = 0.0  # Laplace scale b (legacy: 0, undeclared)
    epsilon: float = 0.0
    mechanism: str = ""
    privacy_unit_s: float = 0.0
    window_s: float = 0.0
    source: MemberReport | LegacyReport | str = ""  # the model, or the checked text it is built from
    window_end_text: str = ""  # the window end as the file wrote it (fast path only)

    @property
    def report(self) -> MemberReport | LegacyReport:
        """The validated model (built from the checked text when the fast path accepted the file)."""
        if isinstance(self.source, str):
            return MemberReport.model_validate_json(self.source)
        return self.source

    def is_fresh(self, now: datetime, stale_after_s: float) -> bool:
        return (now - self.window_end).total_seconds() <= stale_after_s


def check_member_name(name: str) -> None:
    if not is_datasite_email(name):
        raise Rejected("bad_folder_name", f"folder {name!r} is not an email")


def parse_report(data: bytes, *, now: datetime, settings: Settings) -> Accepted:
    """Validate one report file's bytes. Raises Rejected with the reason."""
    if len(data) > settings.max_report_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > {settings.max_report_bytes}")
    accepted = _fast_path(data, settings)
    if accepted is not None:
        if accepted.window_end - now > timedelta(seconds=settings.future_tolerance_s):
            raise Rejected("future", f"time {accepted.window_end.isoformat()} is ahead of {now.isoformat()}")
        return accepted
    obj = _load_json(data)
    if not isinstance(obj, dict):
        raise Rejected("not_an_object", f"top level is {type(obj).__name__}")
    if "schema_version" in obj:
        if type(obj["schema_version"]) is not int or obj["schema_version"] != SCHEMA_VERSION:
            raise Rejected("schema_version", f"schema_version {obj.get('schema_version')!r}, supported: {SCHEMA_VERSION}")
        report = _model(MemberReport, obj)
        _check_consistent(report, settings)
        accepted = _accepted(report)
    elif {"cpu", "timestamp"} <= obj.keys():
        legacy = _model(LegacyReport, obj)
        if not CPU_BOUNDS[0] <= legacy.cpu <= CPU_BOUNDS[1]:  # the tutorial clamps its noisy mean into the bounds
            raise Rejected("implausible_value", f"legacy cpu {legacy.cpu} outside {list(CPU_BOUNDS)}")
        accepted = Accepted("legacy", legacy.created_at, legacy.created_at, legacy.cpu, source=legacy)
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


REL, ABS = 1e-6, 1e-12  # the privacy numbers must agree up to rounding
isclose = math.isclose


def _accepted(r: MemberReport) -> Accepted:
    rel = r.release
    return Accepted("report", r.created_at, r.window.end, rel.value, rel.noise_scale, rel.epsilon, rel.mechanism,
                    r.privacy_unit.seconds, r.window.seconds, source=r)


def _check_consistent(r: MemberReport, settings: Settings) -> None:
    """The report's own privacy numbers must agree: otherwise its declared noise cannot be trusted."""
    rel, w = r.release, r.window
    _check_numbers(r.bounds, w.n_samples, w.sample_period_s, w.seconds, rel.value, rel.epsilon, rel.sensitivity,
                   rel.noise_scale, rel.noise_std, r.cpu, settings)


def _check_numbers(bounds: tuple[float, float], n_samples: int, sample_period_s: float, window_s: float, value: float,
                   epsilon: float, sensitivity: float, noise_scale: float, noise_std: float, cpu: float | None,
                   settings: Settings) -> None:
    lo, hi = bounds
    if (lo, hi) != CPU_BOUNDS:
        raise Rejected("inconsistent", f"bounds {bounds} are not {CPU_BOUNDS}")
    if n_samples * sample_period_s > 1.5 * window_s + 1.0:
        raise Rejected("inconsistent", f"{n_samples} samples of {sample_period_s} s cannot fit in {window_s:.1f} s")
    if not isclose(sensitivity, (hi - lo) / n_samples, rel_tol=REL, abs_tol=ABS):
        raise Rejected("inconsistent", f"sensitivity {sensitivity} != (upper - lower) / n_samples")
    if not isclose(noise_scale, sensitivity / epsilon, rel_tol=REL, abs_tol=ABS):
        raise Rejected("inconsistent", f"noise_scale {noise_scale} != sensitivity / epsilon")
    if not isclose(noise_std, math.sqrt(2) * noise_scale, rel_tol=REL, abs_tol=ABS):
        raise Rejected("inconsistent", f"noise_std {noise_std} != sqrt(2) * noise_scale")
    if epsilon > settings.max_epsilon:
        raise Rejected("epsilon_out_of_range", f"epsilon {epsilon} > {settings.max_epsilon}")
    if noise_scale > settings.max_noise_scale:
        raise Rejected("noise_out_of_range", f"noise scale {noise_scale} > {settings.max_noise_scale}")
    margin = PLAUSIBLE_SCALES * noise_scale
    if not lo - margin <= value <= hi + margin:
        raise Rejected("implausible_value", f"value {value} outside [{lo - margin:.4g}, {hi + margin:.4g}]")
    if cpu is not None and not isclose(cpu, value, rel_tol=REL, abs_tol=ABS):
        raise Rejected("inconsistent", "legacy key cpu differs from release.value")


# ---------------------------------------------------------------------------------------------------
# The fast path: the member app's own layout
# ---------------------------------------------------------------------------------------------------
_NUMBER = r"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"  # a JSON number, as json.loads reads it
_INT = r"(-?(?:0|[1-9][0-9]*))"
_STRING = r'"([^"\\\x00-\x1f]*)"'  # a JSON string without escapes: its text is its value
_TIME = (r'"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?'
         r'(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9]))"')  # RFC 3339 with an offset, as pydantic writes it


def _layout() -> tuple[re.Pattern[str], tuple[str, ...]]:
    """The regular expression of a MemberReport as the member writes it (``atomic_write_json``, indent 2),
    built from the models themselves, and the names of its groups in order. Fixed values (schema_version,
    kind, metric, mechanism, unit name) stay literal; every other value is a typed group."""

    def slot(kind: str, name: str) -> str:
        return f"@@{kind}:{name}@@"

    num = lambda name: slot("NUMBER", name)  # noqa: E731
    model = MemberReport.model_construct(
        app_version=slot("STRING", "app_version"), created_at=slot("TIME", "created_at"),
        bounds=(num("lo"), num("hi")),
        window=Window.model_construct(start=slot("TIME", "start"), end=slot("TIME", "end"),
                                      n_samples=slot("INT", "n_samples"), sample_period_s=num("sample_period_s")),
        release=LaplaceRelease.model_construct(
            value=num("value"), epsilon=num("epsilon"), delta=num("delta"), sensitivity=num("sensitivity"),
            noise_scale=num("noise_scale"), noise_std=num("noise_std"), implementation=slot("STRING", "implementation")),
        privacy_unit=PrivacyUnit.model_construct(seconds=num("seconds"), description=slot("STRING", "description")),
        cpu=num("cpu"), timestamp=slot("STRING", "timestamp"),
    )
    layout = re.escape(json.dumps(model.model_dump(mode="json", warnings=False), indent=2, ensure_ascii=False))
    groups = {"NUMBER": _NUMBER, "INT": _INT, "STRING": _STRING, "TIME": _TIME}
    names: list[str] = []

    def typed(m: re.Match) -> str:
        names.append(m.group(2))
        return groups[m.group(1)]

    pattern = re.sub(r'"@@(NUMBER|INT|STRING|TIME):(\w+)@@"', typed, layout)
    return re.compile(pattern + r"\s*"), tuple(names)


_GROUPS = ("app_version", "created_at", "lo", "hi", "start", "end", "n_samples", "sample_period_s", "value", "epsilon",
           "delta", "sensitivity", "noise_scale", "noise_std", "implementation", "seconds", "description", "cpu",
           "timestamp")
_LAYOUT, _names = _layout()
if _names != _GROUPS:  # the model changed shape: every file takes the general path until _fast_path follows
    _LAYOUT = None
_isfinite = math.isfinite
_fromiso = datetime.fromisoformat


def _fast_path(data: bytes, settings: Settings) -> Accepted | None:
    """The file accepted if it is in the member app's exact layout and valid; None when the general path must
    decide (never a rejection: the general path gives every reason)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    m = _LAYOUT.fullmatch(text) if _LAYOUT is not None else None
    if m is None:
        return None
    _, created_at, lo, hi, start, end, n_samples, period, value, eps, delta, sens, scale, std, _, unit_s, _, cpu, _ = (
        m.groups())
    try:
        lo, hi, period, value, eps, delta = float(lo), float(hi), float(period), float(value), float(eps), float(delta)
        sens, scale, std, unit_s, cpu = float(sens), float(scale), float(std), float(unit_s), float(cpu)
        n_samples = int(n_samples)
        created_at, start, end = _fromiso(created_at), _fromiso(start), _fromiso(end)
    except ValueError:
        return None
    # what the models check: finite numbers (the rest is checked below or by _check_numbers), positive
    # parameters, delta 0, the sample count's range, an ordered window, increasing bounds
    if not (_isfinite(value) and _isfinite(cpu) and _isfinite(std) and _isfinite(unit_s) and _isfinite(period)
            and _isfinite(sens) and _isfinite(eps) and _isfinite(scale) and _isfinite(lo) and _isfinite(hi)):
        return None
    if not (period > 0 and eps > 0 and sens > 0 and scale > 0 and std > 0 and unit_s > 0 and delta == 0
            and 1 <= n_samples <= 10**9 and end > start and lo < hi):
        return None
    window_s = (end - start).total_seconds()
    try:
        _check_numbers((lo, hi), n_samples, period, window_s, value, eps, sens, scale, std, cpu, settings)
    except Rejected:
        return None
    return Accepted("report", created_at, end, value, scale, eps, "laplace", unit_s, window_s, text, m.group(6))
