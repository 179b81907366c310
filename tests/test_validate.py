"""Validation of one member report file (``cpu_tracker_aggregator.validate``): every reason, every boundary.

The valid report is the one the member app writes (the real ``build_report``, fixed raw mean and seed). The
mutations are derived from it and from the models (which fields are required, which accept null), in the spirit
of Flower's ``product(all, all) - valid``: exhaustive, with the expected outcome computed, not guessed.
The committed corpus in ``tests/corpus/`` holds one file per nasty case, named after its expected reason.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import types
import typing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from cpu_tracker_aggregator.roster import accepted_entry, is_fresh
from cpu_tracker_aggregator.validate import (
    PLAUSIBLE_SCALES,
    REASONS,
    Accepted,
    Rejected,
    check_member_name,
    parse_report,
    us,
)
from cpu_tracker_member.member import build_report
from shared.wire.schema import MemberReport
from shared.settings import Settings

SETTINGS = Settings(aggregator="agg@example.org")
START = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
END = START + timedelta(seconds=SETTINGS.interval_s)
NOW = END + timedelta(seconds=1)  # whole seconds, so legacy timestamps ("YYYY-MM-DD HH:MM:SS") can sit on boundaries
RAW_MEAN = 49.595  # the window's (private) mean CPU; the release adds Laplace noise to it
TUTORIAL = {"cpu": 34.3, "timestamp": "2024-12-14 06:38:53"}
CORPUS = Path(__file__).parent / "corpus"
CORPUS_NOW = datetime(2025, 1, 1, 12, 0, 21, tzinfo=timezone.utc)  # see tests/corpus/README.md

# Reasons that only the file system or the roster can produce (cpu_tracker_aggregator.reader and .roster);
# tests/test_aggregator.py and tests/test_hostile.py cover them. Every other reason must be produced from bytes below.
FILE_SYSTEM_REASONS = {"symlink", "not_a_file", "bad_folder_name", "not_member", "unreadable"}
BYTES_REASONS = set(REASONS) - FILE_SYSTEM_REASONS

Path_ = tuple  # a path into the report dict: keys and list indices


@functools.cache
def _valid() -> dict:
    _, report = build_report(RAW_MEAN, SETTINGS.samples_per_window, START, END, SETTINGS, random_state=1)
    return report.model_dump(mode="json")


def valid() -> dict:
    """The member app's report for the fixed window, as the JSON object it writes (a fresh copy)."""
    return copy.deepcopy(_valid())


def fresh_at(accepted: Accepted, now: datetime, *, seen: datetime | None = None) -> bool:
    """``roster.is_fresh`` for a report first seen at ``seen`` (default: its own window end)."""
    entry = accepted_entry(accepted, None, us(seen or accepted.window_end))
    return is_fresh(entry, us(now), SETTINGS)


def encode(obj) -> bytes:
    """What the member writes (``atomic_write_json``): strict JSON, indented."""
    return json.dumps(obj, indent=2, allow_nan=False, ensure_ascii=False).encode()


def outcome(data: bytes, *, now: datetime = NOW, settings: Settings = SETTINGS) -> str:
    """``"accepted:<kind>"`` or the rejection reason. Anything but ``Rejected`` propagates (and fails the test)."""
    try:
        accepted = parse_report(data, now=now, settings=settings)
    except Rejected as r:
        assert r.reason in REASONS
        return r.reason
    assert isinstance(accepted, Accepted)
    return f"accepted:{accepted.kind}"


def get(obj, path: Path_):
    for key in path:
        obj = obj[key]
    return obj


def with_value(obj: dict, path: Path_, value) -> dict:
    obj = copy.deepcopy(obj)
    get(obj, path[:-1])[path[-1]] = value
    return obj


def without(obj: dict, path: Path_) -> dict:
    obj = copy.deepcopy(obj)
    del get(obj, path[:-1])[path[-1]]
    return obj


def all_paths(obj, prefix: Path_ = ()) -> list[Path_]:
    """Every key and list index in ``obj``, containers included, depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(all_paths(value, (*prefix, key)))
    return out


def consistent(obj: dict, *, n_samples: int | None = None, epsilon: float | None = None) -> dict:
    """``obj`` with n_samples / epsilon changed and sensitivity, noise_scale, noise_std recomputed to agree."""
    obj = copy.deepcopy(obj)
    w, r = obj["window"], obj["release"]
    w["n_samples"] = n_samples or w["n_samples"]
    r["epsilon"] = epsilon or r["epsilon"]
    lo, hi = obj["bounds"]
    r["sensitivity"] = (hi - lo) / w["n_samples"]
    r["noise_scale"] = r["sensitivity"] / r["epsilon"]
    r["noise_std"] = math.sqrt(2) * r["noise_scale"]
    return obj


def shifted(obj: dict, delta: timedelta) -> dict:
    """``obj`` with every time moved by ``delta`` (window, created_at and the legacy timestamp)."""
    obj = copy.deepcopy(obj)
    iso = lambda s: (datetime.fromisoformat(s) + delta).isoformat()  # noqa: E731
    obj["created_at"] = iso(obj["created_at"])
    obj["window"]["start"] = iso(obj["window"]["start"])
    obj["window"]["end"] = iso(obj["window"]["end"])
    obj["timestamp"] = (datetime.fromisoformat(obj["timestamp"]) + delta).strftime("%Y-%m-%d %H:%M:%S")
    return obj


def field_of(path: Path_):
    """The pydantic field a path into a MemberReport dict names, or None for a list element."""
    model, field = MemberReport, None
    for key in path:
        if isinstance(key, int):
            return None
        field = model.model_fields[key]
        model = field.annotation
    return field


def allows_none(field) -> bool:
    ann = field.annotation
    return ann is type(None) or (
        typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in typing.get_args(ann)
    )


# ---------------------------------------------------------------------------------------------------
# The valid report
# ---------------------------------------------------------------------------------------------------
def test_the_member_apps_report_is_accepted() -> None:
    accepted = parse_report(encode(valid()), now=NOW, settings=SETTINGS)
    assert accepted.kind == "report"
    assert accepted.window_end == END
    assert accepted.value == _valid()["release"]["value"]
    assert (accepted.noise_scale, accepted.epsilon, accepted.mechanism) == (1.0, SETTINGS.epsilon, "laplace")
    assert (accepted.privacy_unit_s, accepted.window_s) == (1.0, SETTINGS.interval_s)  # one second of activity
    assert fresh_at(accepted, NOW)


def test_build_report_is_deterministic_with_a_seed() -> None:
    again = build_report(RAW_MEAN, SETTINGS.samples_per_window, START, END, SETTINGS, random_state=1)[1]
    assert again.model_dump(mode="json") == _valid()
    assert _valid()["window"]["n_samples"] == 20 and _valid()["release"]["value"] != RAW_MEAN  # 20 s of 1 s units


@pytest.mark.parametrize(
    "dump", [encode, lambda o: json.dumps(o).encode(), lambda o: json.dumps(o, separators=(",", ":")).encode()]
)
def test_any_json_formatting_is_accepted(dump) -> None:
    assert outcome(dump(valid())) == "accepted:report"


# ---------------------------------------------------------------------------------------------------
# One case per reason (and the accepted neighbours), table-driven
# ---------------------------------------------------------------------------------------------------
def _padded(obj: dict, size: int) -> bytes:
    data = encode(obj)
    assert len(data) <= size
    return data + b" " * (size - len(data))


def _cases() -> list:
    v = valid()
    text = encode(v).decode()
    value = v["release"]["value"]
    b = v["release"]["noise_scale"]
    tut = json.dumps(TUTORIAL)
    c = []

    def case(expected: str, id: str, data) -> None:
        if isinstance(data, dict | list):
            data = encode(data)
        elif isinstance(data, str):
            data = data.encode()
        c.append(pytest.param(data, expected, id=f"{expected}-{id}"))

    case("accepted:report", "member_app", v)
    case("accepted:report", "unknown_fields_ignored", {**v, "gpu": {"new": [1, 2]}})
    case("accepted:report", "without_legacy_keys", without(without(v, ("cpu",)), ("timestamp",)))
    case("accepted:report", "exactly_max_bytes", _padded(v, SETTINGS.max_report_bytes))
    case("accepted:legacy", "tutorial", TUTORIAL)
    case("accepted:legacy", "aware_timestamp", {"cpu": 0, "timestamp": "2025-01-01T12:00:00+01:00"})
    case("accepted:legacy", "cpu_bounds_0", {"cpu": 0.0, "timestamp": TUTORIAL["timestamp"]})
    case("accepted:legacy", "cpu_bounds_100", {"cpu": 100, "timestamp": TUTORIAL["timestamp"]})
    case("accepted:legacy", "no_schema_version_but_legacy_keys", without(v, ("schema_version",)))

    case("too_large", "one_byte_over", _padded(v, SETTINGS.max_report_bytes + 1))
    case("too_large", "megabyte_of_garbage", b"\xff" * 1_000_000)

    case("not_utf8", "latin1", tut[:-1].encode() + b', "host": "caf\xe9"}')
    case("not_utf8", "utf16", tut.encode("utf-16"))
    case("not_utf8", "lone_continuation", b"\x80")
    case("not_utf8", "surrogate_bytes", b'{"cpu": "\xed\xa0\x80"}')

    case("not_json", "empty", b"")
    case("not_json", "whitespace", b" \n\t")
    case("not_json", "truncated_report", text[: len(text) // 2])
    case("not_json", "truncated_one_byte_short", text.rstrip()[:-1])
    case("not_json", "truncated_number", b'{"cpu": 3')
    case("not_json", "utf8_bom", b"\xef\xbb\xbf" + tut.encode())
    case("not_json", "single_quotes", tut.replace('"', "'"))
    case("not_json", "trailing_comma", tut[:-1] + ",}")
    case("not_json", "two_documents", tut + tut)
    case("not_json", "nul", b"\x00")
    case("not_json", "python_none", b'{"cpu": None}')
    case("not_json", "int_over_4300_digits", b'{"cpu": ' + b"9" * 5000 + b"}")

    case("duplicate_keys", "top_level", '{"cpu": 1, "cpu": 2, "timestamp": "2024-12-14 06:38:53"}')
    case("duplicate_keys", "in_window", text.replace('"window": {', '"window": {"n_samples": 1, ', 1))
    case("duplicate_keys", "same_value_twice", '{"cpu": 1, "cpu": 1, "timestamp": "2024-12-14 06:38:53"}')

    num = f'"value": {value!r}'
    assert num in text
    for token in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400"):
        case("non_finite", f"value_{token}", text.replace(num, f'"value": {token}', 1))
    case("non_finite", "legacy_nan", b'{"cpu": NaN, "timestamp": "2024-12-14 06:38:53"}')
    case("non_finite", "ignored_field_infinity", text.replace("{", '{"extra": Infinity, ', 1))

    case("too_deep", "arrays", b"[" * 5000 + b"]" * 5000)
    case("too_deep", "objects", b'{"a":' * 2000 + b"0" + b"}" * 2000)
    case("too_deep", "unclosed_inside_report", text.replace("{", '{"extra": ' + "[" * 5000, 1))

    docs = [("array", [v]), ("empty_array", []), ("null", None), ("number", 34.3), ("string", "x"), ("true", True)]
    for id, doc in docs:
        case("not_an_object", id, json.dumps(doc))

    for bad in (2, 0, -1, "1", None, [], {}, 1.5):
        case("schema_version", f"{bad!r}", with_value(v, ("schema_version",), bad))

    case("schema", "empty_object", {})
    case("schema", "cpu_only", {"cpu": 34.3})
    case("schema", "timestamp_only", {"timestamp": TUTORIAL["timestamp"]})
    case("schema", "legacy_bad_timestamp", {"cpu": 34.3, "timestamp": "yesterday"})
    case("schema", "legacy_cpu_string", {"cpu": "high", "timestamp": TUTORIAL["timestamp"]})
    case("schema", "window_reversed", with_value(with_value(v, ("window", "end"), v["window"]["start"]),
                                                 ("window", "start"), v["window"]["end"]))
    case("schema", "window_empty", with_value(v, ("window", "end"), v["window"]["start"]))
    case("schema", "naive_created_at", with_value(v, ("created_at",), "2025-01-01T12:00:20"))
    case("schema", "delta_nonzero", with_value(v, ("release", "delta"), 1e-9))
    case("schema", "mechanism_gaussian", with_value(v, ("release", "mechanism"), "gaussian"))
    case("schema", "kind_dashboard", with_value(v, ("kind",), "cpu_tracker.dashboard"))
    case("schema", "metric_other", with_value(v, ("metric",), "ram_percent"))
    case("schema", "epsilon_zero", with_value(v, ("release", "epsilon"), 0))
    case("schema", "epsilon_negative", with_value(v, ("release", "epsilon"), -0.5))
    case("schema", "n_samples_zero", with_value(v, ("window", "n_samples"), 0))
    case("schema", "n_samples_fraction", with_value(v, ("window", "n_samples"), 200.5))
    case("schema", "bounds_reversed", with_value(v, ("bounds",), [100.0, 0.0]))
    case("schema", "bounds_three", with_value(v, ("bounds",), [0.0, 50.0, 100.0]))
    case("schema", "value_beyond_float", with_value(v, ("release", "value"), 10**400))

    case("inconsistent", "bounds", with_value(v, ("bounds",), [0.0, 50.0]))
    case("inconsistent", "sensitivity", with_value(v, ("release", "sensitivity"), 1.0))
    case("inconsistent", "noise_scale", with_value(v, ("release", "noise_scale"), 2 * b))
    case("inconsistent", "noise_std", with_value(v, ("release", "noise_std"), b))
    case("inconsistent", "too_many_samples_for_window", consistent(v, n_samples=1000))
    case("inconsistent", "cpu_differs_from_value", with_value(v, ("cpu",), value + 0.01))

    case("epsilon_out_of_range", "just_above_max",
         consistent(v, epsilon=math.nextafter(SETTINGS.max_epsilon, math.inf)))
    case("epsilon_out_of_range", "huge", consistent(v, epsilon=1e6))
    # n = 2 samples: sensitivity 50, so epsilon 0.49 gives a scale of 102, far above the cap
    case("noise_out_of_range", "scale_above_max", consistent(v, n_samples=2, epsilon=0.49))
    case("noise_out_of_range", "tiny_epsilon", consistent(v, epsilon=1e-6))

    hi, lo = 100 + PLAUSIBLE_SCALES * b, 0 - PLAUSIBLE_SCALES * b
    with_release_value = lambda x: with_value(with_value(v, ("release", "value"), x), ("cpu",), None)  # noqa: E731
    case("implausible_value", "just_above", with_release_value(math.nextafter(hi, math.inf)))
    case("implausible_value", "just_below", with_release_value(math.nextafter(lo, -math.inf)))
    case("accepted:report", "value_at_upper_margin", with_value(with_value(v, ("release", "value"), hi), ("cpu",), hi))
    case("accepted:report", "value_at_lower_margin", with_value(with_value(v, ("release", "value"), lo), ("cpu",), lo))
    case("implausible_value", "legacy_above_100", {"cpu": 100.5, "timestamp": TUTORIAL["timestamp"]})
    case("implausible_value", "legacy_negative", {"cpu": -0.001, "timestamp": TUTORIAL["timestamp"]})

    tol = timedelta(seconds=SETTINGS.future_tolerance_s)
    ahead = NOW + tol - END  # shift that puts the window's end exactly at now + tolerance
    case("accepted:report", "window_end_at_future_tolerance", shifted(v, ahead))
    case("future", "window_end_1us_beyond_tolerance", shifted(v, ahead + timedelta(microseconds=1)))
    case("future", "one_year_ahead", shifted(v, timedelta(days=365)))
    case("future", "window_end_beyond_tolerance_in_other_zone", with_value(
        shifted(v, ahead + timedelta(seconds=1)), ("window", "end"),
        (END + ahead + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=-5))).isoformat()))
    at = (NOW + tol).strftime("%Y-%m-%d %H:%M:%S")
    case("accepted:legacy", "legacy_at_future_tolerance", {"cpu": 34.3, "timestamp": at})
    beyond = (NOW + tol + timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S")
    case("future", "legacy_one_second_beyond", {"cpu": 34.3, "timestamp": beyond})
    return c


CASES = _cases()


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_case(data: bytes, expected: str) -> None:
    assert outcome(data) == expected


def test_every_reason_has_a_case() -> None:
    """A new reason in REASONS needs a case here (or in FILE_SYSTEM_REASONS, tested with the collector)."""
    covered = {p.values[1] for p in CASES}
    assert BYTES_REASONS <= covered, f"reasons without a case: {sorted(BYTES_REASONS - covered)}"
    assert covered - {"accepted:report", "accepted:legacy"} <= set(REASONS)


def test_the_size_cap_follows_the_setting() -> None:
    small = Settings(aggregator="agg@example.org", max_report_bytes=1024)
    data = encode(valid())
    assert len(data) < 1024
    assert outcome(data + b" " * (1024 - len(data)), settings=small) == "accepted:report"
    assert outcome(data + b" " * (1025 - len(data)), settings=small) == "too_large"


def test_the_epsilon_cap_follows_the_setting() -> None:
    strict = Settings(aggregator="agg@example.org", max_epsilon=1.0)
    assert outcome(encode(consistent(valid(), epsilon=1.0)), settings=strict) == "accepted:report"
    assert outcome(encode(consistent(valid(), epsilon=1.01)), settings=strict) == "epsilon_out_of_range"


def test_rejected_names_its_reason_and_detail() -> None:
    with pytest.raises(Rejected) as info:
        parse_report(b'{"cpu": 1, "cpu": 2}', now=NOW, settings=SETTINGS)
    assert info.value.reason == "duplicate_keys"
    assert "'cpu'" in info.value.detail and str(info.value).startswith("duplicate_keys: ")


# ---------------------------------------------------------------------------------------------------
# Exhaustive mutations of the valid report, expected outcome derived from the models
# ---------------------------------------------------------------------------------------------------
VALID_PATHS = all_paths(_valid())
KEY_PATHS = [p for p in VALID_PATHS if isinstance(p[-1], str)]


def _removal_expected(path: Path_) -> str:
    if path == ("schema_version",):
        return "accepted:legacy"  # no schema_version, but cpu + timestamp: it reads as the tutorial's report
    field = field_of(path)
    return "schema" if field.is_required() else "accepted:report"


@pytest.mark.parametrize("path", KEY_PATHS, ids=".".join)
def test_removing_any_key(path: Path_) -> None:
    assert outcome(encode(without(valid(), path))) == _removal_expected(path)


def test_removal_table_is_not_vacuous() -> None:
    expected = [_removal_expected(p) for p in KEY_PATHS]
    assert expected.count("schema") >= 12 and expected.count("accepted:report") >= 8


def _replacement_expected(path: Path_, bad) -> str:
    if path == ("schema_version",):
        return "schema_version"
    field = field_of(path)
    if bad is None and field is not None and allows_none(field):
        return "accepted:report"
    return "schema"


@pytest.mark.parametrize("bad", [None, [], {}], ids=["null", "list", "object"])
@pytest.mark.parametrize("path", VALID_PATHS, ids=lambda p: ".".join(map(str, p)))
def test_replacing_any_value_with_the_wrong_type(path: Path_, bad) -> None:
    assert outcome(encode(with_value(valid(), path, bad))) == _replacement_expected(path, bad)


N_CHOICES = (20, 10)  # whole seconds in the 20 s window (the fixed unit: one second of activity)
EPS_CHOICES = (5.0, 10.0)
SENS_CHOICES = sorted({100 / n for n in N_CHOICES} | {0.25})
SCALE_CHOICES = sorted({s / e for s in SENS_CHOICES for e in EPS_CHOICES})
STD_CHOICES = sorted({math.sqrt(2) * b for b in SCALE_CHOICES} | {1.0})
PRIVACY_PRODUCT = list(itertools.product(N_CHOICES, EPS_CHOICES, SENS_CHOICES, SCALE_CHOICES, STD_CHOICES))


@pytest.mark.parametrize(("n", "eps", "sens", "scale", "std"), PRIVACY_PRODUCT)
def test_privacy_numbers_product(n: int, eps: float, sens: float, scale: float, std: float) -> None:
    """Every combination of n_samples, epsilon, sensitivity, noise_scale, noise_std: only those that agree
    (sensitivity = 100 / n, scale = sensitivity / epsilon, std = sqrt(2) scale) are accepted."""
    obj = valid()
    obj["window"]["n_samples"] = n
    obj["release"].update(epsilon=eps, sensitivity=sens, noise_scale=scale, noise_std=std)
    agree = math.isclose(sens, 100 / n) and math.isclose(scale, sens / eps) and math.isclose(std, math.sqrt(2) * scale)
    assert outcome(encode(obj)) == ("accepted:report" if agree else "inconsistent")


def test_privacy_product_has_both_outcomes() -> None:
    agree = [p for p in PRIVACY_PRODUCT if math.isclose(p[2], 100 / p[0]) and math.isclose(p[3], p[2] / p[1])
             and math.isclose(p[4], math.sqrt(2) * p[3])]
    assert len(agree) == len(N_CHOICES) * len(EPS_CHOICES) and len(PRIVACY_PRODUCT) > 10 * len(agree)


@pytest.mark.parametrize(("lo", "hi"), list(itertools.product((0.0, -1.0, 50.0, 100.0), (100.0, 101.0, 50.0, 0.0))))
def test_bounds_product(lo: float, hi: float) -> None:
    expected = "accepted:report" if (lo, hi) == (0.0, 100.0) else "inconsistent" if lo < hi else "schema"
    assert outcome(encode(with_value(valid(), ("bounds",), [lo, hi]))) == expected


@pytest.mark.parametrize("factor", [1 + 1e-9, 1 - 1e-9, 1 + 1e-4, 1 - 1e-4])
@pytest.mark.parametrize("key", ["sensitivity", "noise_scale", "noise_std"])
def test_privacy_numbers_tolerate_rounding_only(key: str, factor: float) -> None:
    obj = valid()
    obj["release"][key] *= factor
    assert outcome(encode(obj)) == ("accepted:report" if abs(factor - 1) < 1e-6 else "inconsistent")


def _fits(n: int, period: float, seconds: float) -> bool:
    return n * period <= 1.5 * seconds + 1.0  # the rule in validate._check_consistent


@pytest.mark.parametrize("n", [1, 10, 20, 30, 31, 32, 100, 10**6])
def test_samples_must_fit_in_the_window(n: int) -> None:
    """The window is 20 s of 1 s units: up to 1.5 x 20 + 1 = 31 s worth of units is tolerated."""
    obj = consistent(valid(), n_samples=n, epsilon=10.0)  # epsilon 10 keeps n = 1 at the noise cap
    expected = "accepted:report" if _fits(n, 1.0, SETTINGS.interval_s) else "inconsistent"
    assert expected == ("accepted:report" if n <= 31 else "inconsistent")  # the rule, spelled out once
    assert outcome(encode(obj)) == expected


@pytest.mark.parametrize(("eps", "expected"), [(10.0, "accepted:report"), (10.000001, "epsilon_out_of_range")])
def test_epsilon_boundary(eps: float, expected: str) -> None:
    assert outcome(encode(consistent(valid(), epsilon=eps))) == expected


@pytest.mark.parametrize(("eps", "expected"), [(1.0, "accepted:report"), (0.9999, "noise_out_of_range")])
def test_noise_scale_boundary(eps: float, expected: str) -> None:
    obj = consistent(valid(), n_samples=10, epsilon=eps)  # sensitivity 10: scale = 10 / eps, the cap is 10
    assert obj["release"]["noise_scale"] == pytest.approx(SETTINGS.max_noise_scale, rel=1e-3)
    assert outcome(encode(obj)) == expected


@pytest.mark.parametrize("cpu", [-1e-9, 0.0, 50.0, 100.0, 100 + 1e-9])
def test_legacy_cpu_range(cpu: float) -> None:
    expected = "accepted:legacy" if 0 <= cpu <= 100 else "implausible_value"
    assert outcome(encode({"cpu": cpu, "timestamp": TUTORIAL["timestamp"]})) == expected


# ---------------------------------------------------------------------------------------------------
# Legacy reports and freshness
# ---------------------------------------------------------------------------------------------------
def test_tutorial_report_is_legacy_with_its_utc_time() -> None:
    accepted = parse_report(json.dumps(TUTORIAL).encode(), now=NOW, settings=SETTINGS)
    assert accepted.kind == "legacy"
    assert accepted.value == 34.3
    assert accepted.window_end == datetime(2024, 12, 14, 6, 38, 53, tzinfo=timezone.utc)
    assert not fresh_at(accepted, NOW, seen=NOW)


@pytest.mark.parametrize("kind", ["report", "legacy"])
def test_fresh_until_stale_after_s_inclusive(kind: str) -> None:
    data = encode(valid()) if kind == "report" else encode({"cpu": 1.0, "timestamp": END.strftime("%Y-%m-%d %H:%M:%S")})
    accepted = parse_report(data, now=NOW, settings=SETTINGS)
    boundary = END + timedelta(seconds=SETTINGS.stale_after_s)
    assert accepted.window_end == END
    assert fresh_at(accepted, boundary)
    assert not fresh_at(accepted, boundary + timedelta(microseconds=1))
    skewed = END - timedelta(seconds=SETTINGS.future_tolerance_s)  # the aggregator's clock behind the member's
    assert fresh_at(accepted, skewed)


def test_freshness_counts_from_the_window_end_not_created_at() -> None:
    obj = with_value(valid(), ("created_at",), (END + timedelta(seconds=30)).isoformat())
    accepted = parse_report(encode(obj), now=NOW, settings=SETTINGS)
    assert accepted.window_end == END
    assert not fresh_at(accepted, END + timedelta(seconds=SETTINGS.stale_after_s + 1))


@pytest.mark.parametrize(
    ("name", "ok"),
    [("alice@example.org", True), ("a@b", False), ("alice", False), ("", False), ("a@b@c", False),
     ("a b@example.org", False), ("..", False), ("a/b@c", False), ("a@b\\c", False), ("@example.org", False)],
)
def test_member_folder_names(name: str, ok: bool) -> None:
    if ok:
        check_member_name(name)
    else:
        with pytest.raises(Rejected) as info:
            check_member_name(name)
        assert info.value.reason == "bad_folder_name"


# ---------------------------------------------------------------------------------------------------
# The committed corpus
# ---------------------------------------------------------------------------------------------------
CORPUS_FILES = sorted(CORPUS.glob("*.json"))
def expected_from_name(name: str) -> str:
    head, second = name.split(".")[:2]
    return f"accepted:{second}" if head == "accepted" else head


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.name for p in CORPUS_FILES])
def test_corpus(path: Path) -> None:
    assert outcome(path.read_bytes(), now=CORPUS_NOW) == expected_from_name(path.name)


def test_corpus_names_and_coverage() -> None:
    expected = {expected_from_name(p.name) for p in CORPUS_FILES}
    assert expected <= set(REASONS) | {"accepted:report", "accepted:legacy"}, expected - set(REASONS)
    assert BYTES_REASONS <= expected, f"corpus lacks: {sorted(BYTES_REASONS - expected)}"
    assert {"accepted:report", "accepted:legacy"} <= expected


# ---------------------------------------------------------------------------------------------------
# Found once: parse_report must only ever raise Rejected, whatever the numbers and times.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [10**309, 10**400], ids=["1e309", "1e400"])
def test_huge_n_samples_is_rejected_not_raised(n: int) -> None:
    assert outcome(encode(with_value(valid(), ("window", "n_samples"), n))) == "schema"


@pytest.mark.parametrize("ts", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00"])
def test_legacy_timestamp_out_of_utc_range_is_rejected_not_raised(ts: str) -> None:
    assert outcome(encode({"cpu": 34.3, "timestamp": ts})) == "schema"


# ---------------------------------------------------------------------------------------------------
# Property tests: nothing but Rejected ever escapes
# ---------------------------------------------------------------------------------------------------
PROPERTY = hyp_settings(
    max_examples=300, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))  # whole minutes
TIMES = (  # ISO strings, aware and naive, with the extremes of datetime (where conversions overflow)
    st.datetimes(timezones=OFFSETS).map(datetime.isoformat)
    | st.datetimes().map(datetime.isoformat)
    | st.builds(lambda d, tz: d.replace(tzinfo=tz).isoformat(), st.sampled_from([datetime.min, datetime.max, END]),
                OFFSETS)
)
NUMBERS = (
    st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**1100), 2**1100) | st.integers(2**1023, 2**1100)  # beyond float range: JSON allows them
    | st.sampled_from([0, 1, -1, 100, 2**53 + 1, 10**400, 1e308, -1e308, 5e-324])
)
JSON_SCALARS = (
    st.none() | st.booleans() | NUMBERS | st.text(max_size=20) | TIMES
    | st.sampled_from(["2024-12-14 06:38:53", "laplace", "cpu_sample", "cpu_percent_mean", "cpu_tracker.member_report"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def _never_raises_but_rejected(data: bytes) -> None:
    try:
        accepted = parse_report(data, now=NOW, settings=SETTINGS)
    except Rejected as r:
        assert r.reason in BYTES_REASONS
    else:
        assert accepted.kind in ("report", "legacy")
        assert fresh_at(accepted, NOW, seen=NOW) in (True, False)  # the roster's next step


@PROPERTY
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_only_raise_rejected(data: bytes) -> None:
    _never_raises_but_rejected(data)


@PROPERTY
@given(JSON_VALUES)
def test_arbitrary_json_only_raises_rejected(obj) -> None:
    _never_raises_but_rejected(json.dumps(obj).encode())


NUMERIC_PATHS = [p for p in VALID_PATHS if type(get(_valid(), p)) in (int, float)]
TIME_PATHS = [("created_at",), ("window", "start"), ("window", "end")]


@PROPERTY
@given(st.fixed_dictionaries({"cpu": st.floats(0, 100) | NUMBERS, "timestamp": TIMES}))
def test_well_formed_legacy_with_any_time_only_raises_rejected(obj: dict) -> None:
    _never_raises_but_rejected(json.dumps(obj).encode())


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(NUMERIC_PATHS), NUMBERS) | st.tuples(st.sampled_from(TIME_PATHS), TIMES),
                min_size=1, max_size=2))
def test_valid_report_with_any_numbers_and_times_only_raises_rejected(changes) -> None:
    obj = valid()
    for path, value in changes:
        obj = with_value(obj, path, value)
    _never_raises_but_rejected(json.dumps(obj).encode())


@PROPERTY
@given(st.fixed_dictionaries(
    {"cpu": st.floats(0, 100) | NUMBERS | JSON_VALUES, "timestamp": TIMES | JSON_VALUES},
    optional={"schema_version": JSON_VALUES, "other": JSON_VALUES},
))
def test_arbitrary_legacy_shaped_objects_only_raise_rejected(obj: dict) -> None:
    _never_raises_but_rejected(json.dumps(obj).encode())


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(VALID_PATHS), NUMBERS | TIMES | JSON_VALUES), min_size=1, max_size=3))
def test_valid_report_with_arbitrary_values_only_raises_rejected(changes) -> None:
    obj = valid()
    for path, value in changes:
        try:
            obj = with_value(obj, path, value)
        except (KeyError, IndexError, TypeError):  # an earlier change replaced a container on the way
            pass
    _never_raises_but_rejected(json.dumps(obj).encode())


@PROPERTY
@given(st.data())
def test_valid_report_bytes_cut_or_flipped_only_raise_rejected(data) -> None:
    raw = bytearray(encode(valid()))
    i = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        raw = raw[:i]
    else:
        raw[i] = data.draw(st.integers(0, 255))
    _never_raises_but_rejected(bytes(raw))
