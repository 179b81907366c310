"""Checking one member's report file. Pure: bytes in, an accepted summary or a named reason out.

Every way a file can be wrong has a named reason (``REASONS``); the aggregator counts them and never lets one bad
file stop a tick. Each rule is stated once: the shape and ranges by the pydantic models (``shared.wire.schema``), the
agreement of the privacy numbers by ``_check_numbers``, the time by ``is_future``, strict JSON by ``_strict_json``.

One path. ``model_validate_json`` parses and validates the bytes in one pass (strict mode: no number read from a
string). pydantic's JSON parser lets three things through that strict JSON refuses: a key that
appears twice (the last one wins), NaN / Infinity, and numbers beyond the float range (read as infinity). In a
field the models read, the last two are refused anyway (``allow_inf_nan=False``). Everything else hides in what the
models do not read, so a file is also checked by ``_strict_json`` unless ``_nothing_unread`` proves cheaply that the
models read every key and string in it: no backslash (so each ``"`` delimits a string) and exactly two quotes per
key and string value the models saw. The member app's own files always pass that proof, so only other files pay for
the second parse. When pydantic's parser refuses what the standard one accepts (a lone UTF-16 surrogate in a
string), the standard one's reading is validated instead.
"""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import datetime, timedelta, timezone
from types import UnionType
from typing import Literal, NamedTuple, Union, get_args, get_origin

from pydantic import AwareDatetime, BaseModel, ValidationError

from shared.paths import is_datasite_email
from shared.privacy import CPU_BOUNDS, laplace_scale, window_sensitivity
from shared.wire.schema import SCHEMA_VERSION, LegacyReport, MemberReport
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
    "not_member": "datasite is not on the aggregator's members list",
    "unreadable": "file could not be read",
}
PLAUSIBLE_SCALES = 30.0  # |noise| > 30 b has probability e^-30 ~ 1e-13 for honest Laplace noise
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail or REASONS[reason]}")
        self.reason, self.detail = reason, detail or REASONS[reason]


class Accepted(NamedTuple):
    """A valid report, reduced to what the aggregator uses."""

    kind: Literal["report", "legacy"]
    window_end: datetime  # the report's own time (legacy: its timestamp)
    value: float  # release.value (legacy: cpu)
    noise_scale: float = 0.0  # Laplace scale b (legacy: 0, undeclared)
    epsilon: float = 0.0
    mechanism: str = ""
    privacy_unit_s: float = 0.0
    window_s: float = 0.0


def us(t: datetime) -> int:
    """Exact microseconds since the epoch (times compare exactly, as timedelta arithmetic does)."""
    return (t - _EPOCH) // _US


def is_future(end_us: int, now_us: int, settings: Settings) -> bool:
    """The one time rule at reading: a report dated more than ``future_tolerance_s`` ahead is not (yet) acceptable."""
    return end_us - now_us > settings.future_tolerance_s * 1e6


def future_detail(end_us: int, settings: Settings) -> str:
    """Why a report is refused as from the future: the same text at every tick (it holds no current time)."""
    return f"time {iso(end_us)} is more than {settings.future_tolerance_s:g} s ahead of the aggregator's clock"


def iso(t_us: int) -> str:
    """The UTC ISO 8601 text of a time in microseconds since the epoch (a report may name a time, such as
    9999-12-31T23:59:59-00:01, that lies beyond the range of UTC datetimes)."""
    try:
        return (_EPOCH + timedelta(microseconds=t_us)).isoformat()
    except OverflowError:
        return f"{'after 9999' if t_us > 0 else 'before 0001'} (UTC)"


def check_member_name(name: str) -> None:
    if not is_datasite_email(name):
        raise Rejected("bad_folder_name", f"folder {name!r} is not an email")


def parse_report(data: bytes, *, settings: Settings, now: datetime | None = None) -> Accepted:
    """Validate one report file's bytes (and, given ``now``, its time). Raises Rejected with the reason."""
    if len(data) > settings.max_report_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > {settings.max_report_bytes}")
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected("not_utf8", str(e)) from None
    accepted = _parse(data, settings)
    if now is not None and is_future(end := us(accepted.window_end), us(now), settings):
        raise Rejected("future", future_detail(end, settings))
    return accepted


def _parse(data: bytes, settings: Settings, *, reread: bool = False) -> Accepted:
    try:
        report = MemberReport.model_validate_json(data, strict=True)
    except ValidationError as e:
        return _refused_report(data, e, settings, reread)
    except (OverflowError, ValueError) as e:  # a validator's own arithmetic (a time beyond the UTC range)
        _strict_json(data)
        raise Rejected("schema", str(e)) from None
    obj = None if _nothing_unread(data, report) else _strict_json(data)
    if "schema_version" not in report.model_fields_set:
        return _legacy(data, settings)  # no schema_version: the tutorial's report, if it has its keys
    if not _integer_version(data, obj):  # pydantic reads 1.0 and true as the literal 1
        raise Rejected("schema_version", f"schema_version is not the integer {SCHEMA_VERSION}")
    rel, w = report.release, report.window
    window_s = w.seconds
    _check_numbers(report.bounds, w.n_samples, w.sample_period_s, window_s, rel.value, rel.epsilon, rel.sensitivity,
                   rel.noise_scale, rel.noise_std, report.cpu, settings)
    return Accepted("report", w.end, rel.value, rel.noise_scale, rel.epsilon, rel.mechanism,
                    report.privacy_unit.seconds, window_s)


def _refused_report(data: bytes, error: ValidationError, settings: Settings, reread: bool) -> Accepted:
    """The reason a file that is not a valid MemberReport is refused, or the file read as the tutorial's report."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        if "recursion limit" in first["msg"]:
            raise Rejected("too_deep", first["msg"]) from None
        if reread:
            raise Rejected("not_json", first["msg"]) from None
        obj = _strict_json(data)  # names the reason, unless only pydantic's parser refuses it
        # a lone surrogate in a string: validate what the standard parser read, the surrogate replaced
        return _parse(json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace"), settings, reread=True)
    obj = _strict_json(data)
    if not isinstance(obj, dict):
        raise Rejected("not_an_object", f"top level is {type(obj).__name__}")
    if "schema_version" not in obj:
        return _legacy(data, settings)
    version = [x for x in error.errors() if x["loc"][:1] == ("schema_version",)]
    if version:
        raise Rejected("schema_version", f"schema_version {obj['schema_version']!r}, supported: {SCHEMA_VERSION}")
    raise Rejected("schema", _where(first)) from None


def _legacy(data: bytes, settings: Settings) -> Accepted:
    try:
        legacy = LegacyReport.model_validate_json(data, strict=True)
    except ValidationError as e:
        errors = e.errors()
        if all(x["type"] == "missing" for x in errors):
            raise Rejected("schema", "neither a member report nor a tutorial report (no schema_version, cpu, "
                                     "timestamp)") from None
        _strict_json(data)
        raise Rejected("non_finite" if errors[0]["type"] == "finite_number" else "schema", _where(errors[0])) from None
    except (OverflowError, ValueError) as e:
        _strict_json(data)
        raise Rejected("schema", str(e)) from None
    if not _nothing_unread(data, legacy):
        _strict_json(data)
    if not CPU_BOUNDS[0] <= legacy.cpu <= CPU_BOUNDS[1]:  # the tutorial clamps its noisy mean into the bounds
        raise Rejected("implausible_value", f"legacy cpu {legacy.cpu} outside {list(CPU_BOUNDS)}")
    return Accepted("legacy", legacy.created_at, legacy.cpu)


def _where(error: dict) -> str:
    if error["type"] == "finite_number":  # NaN, Infinity or an overflowing number in a field the models read
        raise Rejected("non_finite", f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from None
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"


# ---------------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------------
def _nothing_unread(data: bytes, model: BaseModel) -> bool:
    """True when the models read every key and every string in ``data``, so nothing (a second key, NaN,
    Infinity, an overflowing number) can hide in it. Without a backslash every ``"`` delimits a string; in strict
    mode a string can only be a key or the value of a str or datetime field, so a file with exactly two quotes per
    key and string value the models saw holds nothing else. False means: not proven, ask ``_strict_json``."""
    if b"\\" in data:
        return False
    return data.count(b'"') == 2 * _strings(model)


_VERSION = re.compile(rb'"schema_version"\s*:\s*([^\s,}]*)')


def _integer_version(data: bytes, obj: dict | None) -> bool:
    """schema_version is written as the JSON integer 1 (``obj``: the document, when ``_strict_json`` read it;
    otherwise every key is known to be a model's, so the only ``"schema_version":`` is the top-level key)."""
    if obj is not None:
        return type(obj["schema_version"]) is int
    m = _VERSION.search(data)
    return m is not None and m.group(1) == str(SCHEMA_VERSION).encode()


def _strings(model: BaseModel) -> int:
    """Keys present in the input and string values among them, over the model and the models nested in it."""
    strings, nested, varying, every = _layout(type(model))
    present = model.__pydantic_fields_set__
    if len(present) == every[0]:  # every field present (the member app's files): no set arithmetic
        n = every[1]
    else:
        n = len(present) + len(strings & present)
        nested, varying = nested & present, varying & present
    for name in nested:
        n += _strings(getattr(model, name))
    for name in varying:  # a union: a string, a model or neither, by the value read
        value = getattr(model, name)
        if type(value) is str or type(value) is datetime:
            n += 1
        elif isinstance(value, BaseModel):
            n += _strings(value)
    return n


@functools.cache
def _layout(cls: type[BaseModel]) -> tuple[frozenset[str], frozenset[str], frozenset[str], tuple[int, int]]:
    """The fields of ``cls`` that always hold a string in strict JSON (str, datetime, string literals), that hold a
    model, and that are unions (decided by their value); and (fields, fields + string fields)."""
    strings, nested, varying = set(), set(), set()
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.add(name)
        elif ann is str or ann is AwareDatetime or (isinstance(ann, type) and issubclass(ann, datetime)) or (
                get_origin(ann) is Literal and all(isinstance(a, str) for a in get_args(ann))):
            strings.add(name)
        elif get_origin(ann) in (Union, UnionType):
            varying.add(name)
    every = len(cls.model_fields)
    return frozenset(strings), frozenset(nested), frozenset(varying), (every, every + len(strings))


def _strict_json(data: bytes):
    """The document as the standard parser reads it, refusing what strict JSON refuses: not UTF-8, not JSON, a key
    twice in one object, NaN / Infinity, a number beyond the float range, nesting deeper than the parser's stack."""
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
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise Rejected("duplicate_keys", f"key {key!r} appears twice")
    return obj


def _no_constants(name: str):
    raise Rejected("non_finite", f"{name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected("non_finite", f"{text[:40]} overflows")
    return value


# ---------------------------------------------------------------------------------------------------
# The privacy numbers must agree
# ---------------------------------------------------------------------------------------------------
REL, ABS = 1e-6, 1e-12  # the privacy numbers must agree up to rounding
isclose = math.isclose


def _check_numbers(bounds: tuple[float, float], n_samples: int, sample_period_s: float, window_s: float, value: float,
                   epsilon: float, sensitivity: float, noise_scale: float, noise_std: float, cpu: float | None,
                   settings: Settings) -> None:
    """The report's own privacy numbers must agree: otherwise its declared noise cannot be trusted."""
    lo, hi = bounds
    if (lo, hi) != CPU_BOUNDS:
        raise Rejected("inconsistent", f"bounds {bounds} are not {CPU_BOUNDS}")
    if n_samples * sample_period_s > 1.5 * window_s + 1.0:
        raise Rejected("inconsistent", f"{n_samples} samples of {sample_period_s} s cannot fit in {window_s:.1f} s")
    if not isclose(sensitivity, window_sensitivity(n_samples), rel_tol=REL, abs_tol=ABS):
        raise Rejected("inconsistent", f"sensitivity {sensitivity} != (upper - lower) / n_samples")
    if not isclose(noise_scale, laplace_scale(sensitivity, epsilon), rel_tol=REL, abs_tol=ABS):
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
