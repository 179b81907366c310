"""Settings and the app process: clear errors that name the setting, one instance per datasite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.host.runner import acquire_lock
from shared.paths import Paths
from shared.settings import Settings, SettingsError, load_settings, settings_warnings

REPO = Path(__file__).resolve().parents[1]
ROLE_MODULES = ("cpu_tracker_member.member", "cpu_tracker_aggregator.aggregator")  # as run.sh names them


def test_file_then_environment(tmp_path):
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "a@x.org"\nepsilon = 0.25\n')
    s = load_settings(tmp_path, {"CPU_TRACKER_INTERVAL_S": "30", "SYFTBOX_CPU_TRACKER_EPSILON": "0.75"})
    assert (s.aggregator, s.epsilon, s.interval_s, s.samples_per_window) == ("a@x.org", 0.75, 30.0, 30)
    s = load_settings(tmp_path, {"SYFTBOX_CPU_TRACKER_EPSILON": "0.75", "CPU_TRACKER_EPSILON": "1"})
    assert s.epsilon == 1.0  # CPU_TRACKER_ wins over SYFTBOX_CPU_TRACKER_


def test_run_shs_own_variables_are_not_taken_for_settings(tmp_path):
    """CPU_TRACKER_ENV_ROOT (and its SYFTBOX_ form) tell run.sh where the environments live; the app must start."""
    s = load_settings(tmp_path, {"CPU_TRACKER_AGGREGATOR": "a@x.org", "CPU_TRACKER_ENV_ROOT": "/envs",
                                 "SYFTBOX_CPU_TRACKER_ENV_ROOT": "/envs"})
    assert s.aggregator == "a@x.org"


def test_budgets_from_environment_json(tmp_path):
    s = load_settings(tmp_path, {"CPU_TRACKER_AGGREGATOR": "a@x.org",
                                 "CPU_TRACKER_BUDGETS": '[{"horizon_s": 60, "epsilon": 3}]'})
    assert [(b.horizon_s, b.epsilon) for b in s.budgets] == [(60, 3)]


@pytest.mark.parametrize(
    "env, file, needle",
    [
        ({}, "", "aggregator is not set"),
        ({"CPU_TRACKER_AGGREGATOR": "a@x.org", "CPU_TRACKER_EPSILON": "-1"}, "", "epsilon"),
        ({"CPU_TRACKER_AGGREGATOR": "a@x.org", "CPU_TRACKER_EPSLION": "1"}, "", "unknown setting CPU_TRACKER_EPSLION"),
        ({"CPU_TRACKER_AGGREGATOR": "a@x.org", "CPU_TRACKER_BUDGETS": "[oops"}, "", "budgets must be JSON"),
        ({}, "aggregator = [", "cannot read"),
        ({}, 'aggregator = "a@x.org"\ninterval_s = 0.1\n', "interval_s"),
        ({}, 'aggregator = "not-an-email"\n', "must be one exact datasite email"),
    ],
)
def test_bad_settings_name_the_culprit(tmp_path, env, file, needle):
    if file:
        (tmp_path / "cpu_tracker.toml").write_text(file)
    with pytest.raises(SettingsError, match=needle):
        load_settings(tmp_path, env)


def test_roles():
    s = Settings(aggregator="agg@x.org")
    assert s.roles("agg@x.org") == {"member", "aggregator"}
    assert s.roles("m@x.org") == {"member"}
    assert s.roles("m@x.org", "aggregator") == {"aggregator"}
    assert s.roles("m@x.org", "both") == {"member", "aggregator"}
    assert Settings(role="aggregator").roles("x@x.org") == {"aggregator"}


def test_lock_is_exclusive(tmp_path):
    first = acquire_lock(tmp_path / "app.lock")
    assert first is not None and acquire_lock(tmp_path / "app.lock") is None
    first.close()
    again = acquire_lock(tmp_path / "app.lock")
    assert again is not None
    again.close()


def _workspace(tmp_path: Path, email: str = "m@x.org") -> Path:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "email": email,
                                  "server_url": "http://127.0.0.1:1", "client_url": "http://127.0.0.1:2"}))
    return config


def _run(config: Path, app_dir: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(app_dir), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "shared.host.runner", *ROLE_MODULES, "--config", str(config), *args],
                          cwd=app_dir, env=env, capture_output=True, text=True, timeout=120)


def test_second_direct_instance_exits_non_zero_so_a_scheduler_retries(tmp_path):
    config = _workspace(tmp_path)
    lock = acquire_lock(Paths(tmp_path / "data", "m@x.org").lock_file)
    try:
        done = _run(config, tmp_path, "--once", env_extra={"CPU_TRACKER_AGGREGATOR": "a@x.org"})
    finally:
        lock.close()
    assert done.returncode == 75 and "already runs" in done.stdout and "Traceback" not in done.stdout + done.stderr


def test_missing_setting_is_one_clear_line_not_a_traceback(tmp_path):
    done = _run(_workspace(tmp_path), tmp_path, "--once")
    assert done.returncode == 2
    assert done.stdout.count("aggregator is not set") == 1 and "cpu_tracker.toml" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_bad_client_config_is_one_clear_line(tmp_path):
    done = _run(tmp_path / "missing.json", tmp_path, "--once")
    assert done.returncode == 2 and "cannot load the SyftBox client config" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_once_publishes_a_report(tmp_path):
    config = _workspace(tmp_path)
    done = _run(config, tmp_path, "--once", "--role", "member",
                env_extra={"CPU_TRACKER_AGGREGATOR": "a@x.org", "CPU_TRACKER_INTERVAL_S": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert Paths(tmp_path / "data", "m@x.org").report_file().exists()


def test_an_unexpected_error_in_a_loop_is_logged_and_stops_the_run(caplog):
    import threading

    from shared.host.worker import _guarded

    def member_loop():
        raise RuntimeError("boom")

    stop, failed = threading.Event(), []
    _guarded(member_loop, stop, failed, "member")()
    assert failed == ["member"] and stop.is_set()
    assert "member stopped by an unexpected error" in caplog.text and "boom" in caplog.text


def test_a_member_too_noisy_for_the_aggregator_is_warned():
    assert settings_warnings(Settings(aggregator="a@x.org")) == []  # the defaults: nothing to say
    warnings = settings_warnings(Settings(aggregator="a@x.org", interval_s=1.0))  # scale 100 / 1 / 5 = 20 > 10
    assert any("Every report will be rejected by an aggregator with max_noise_scale 10" in w for w in warnings)


def test_a_changed_settings_file_stops_the_run_for_a_reload(tmp_path, monkeypatch):
    """The README promises settings changes are picked up within SETTINGS_POLL_S (10 s)."""
    import threading

    import shared.host.worker as app

    monkeypatch.setattr(app, "SETTINGS_POLL_S", 0.05)
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "a@x.org"\n')
    stop, run_stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=app._watch, args=(tmp_path, app._settings_stamp(tmp_path), stop, run_stop))
    watcher.start()
    assert not run_stop.wait(0.3)  # unchanged: the run goes on
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "b@x.org"\nepsilon = 0.25\n')
    assert run_stop.wait(5)
    watcher.join(5)


# ---------------------------------------------------------------------------------------------------
# Issue 9: settings that crash instead of explaining, the aggregator's one exact email; issue 13: sentences
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["*", "*@example.org", "a?@x.org", "[a]@x.org", "a@x.org b", " a@x.org",
                                   "a@x/y.org", "a@x\\y", "a@x.org\n", "a\x00@x.org", "@", "a@b@c"])
def test_aggregator_must_be_one_exact_datasite_email(tmp_path, value):
    (tmp_path / "cpu_tracker.toml").write_text(f"aggregator = {json.dumps(value)}\n")
    with pytest.raises(SettingsError, match="must be one exact datasite email") as e:
        load_settings(tmp_path, {})
    assert repr(value) in str(e.value)  # the message names the value given


@pytest.mark.parametrize(
    "toml, name",
    [
        ("budgets = [{horizon_s = inf, epsilon = 1.0}]", "budgets[0].horizon_s"),
        ("budgets = [{horizon_s = 1e14, epsilon = 1.0}]", "budgets[0].horizon_s"),
        ("budgets = [{horizon_s = 60, epsilon = inf}]", "budgets[0].epsilon"),
        ("budgets = [{horizon_s = nan, epsilon = 1.0}]", "budgets[0].horizon_s"),
        ("future_tolerance_s = 1e15", "future_tolerance_s"),
        ("stale_after_s = inf", "stale_after_s"),
        ("max_noise_scale = inf", "max_noise_scale"),
        ("max_noise_scale = 1e6", "max_noise_scale"),
        ("max_epsilon = inf", "max_epsilon"),
        ("epsilon = nan", "epsilon"),
        ("interval_s = inf", "interval_s"),
        ("tick_s = inf", "tick_s"),
        ("min_members = 100000000000000000000", "min_members"),
        ("max_report_bytes = 100000000000000000000", "max_report_bytes"),
        ("history_points = 100000000000000000000", "history_points"),
    ],
)
def test_non_finite_and_absurd_settings_are_refused_in_a_sentence(tmp_path, toml, name):
    (tmp_path / "cpu_tracker.toml").write_text(f'aggregator = "a@x.org"\n{toml}\n')
    with pytest.raises(SettingsError) as e:
        load_settings(tmp_path, {})
    message = str(e.value)
    assert name in message and "Value error" not in message and "Input should" not in message
    assert message.startswith("The settings in ") and message.endswith(".")


def test_an_empty_budget_list_is_refused_with_the_reason(tmp_path):
    """budgets = [] would silently remove every limit, even the check that no instant is released twice."""
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "a@x.org"\nbudgets = []\n')
    with pytest.raises(SettingsError, match=r"An empty list of budgets .* would remove every limit"):
        load_settings(tmp_path, {})


def test_setting_errors_read_as_sentences(tmp_path):
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "a@x.org"\nepsilon = -1\ninterval_s = "soon"\n')
    with pytest.raises(SettingsError) as e:
        load_settings(tmp_path, {})
    message = str(e.value)
    assert "epsilon = -1 is not accepted: it should be greater than 0." in message
    assert 'interval_s = "soon" is not accepted: it should be a valid number' in message
    assert "Value error" not in message


def test_default_settings_never_pause_and_say_nothing():
    s = Settings(aggregator="a@x.org")
    assert settings_warnings(s) == []
    assert s.epsilon == 5.0 and [b.epsilon for b in s.budgets] == [10.0, 1000.0, 24000.0]


def test_settings_that_will_pause_releases_say_how_long_into_each_span():
    """epsilon 10 at 20 s windows: 181 windows touch an hour (1,810 > 1,000): the hourly budget lasts 100 releases,
    about 33 minutes into every hour; the day budget 2,400 releases (13.3 hours). Back-to-back windows touch an
    instant once (10 <= 10): the per-instant budget never binds."""
    warnings = settings_warnings(Settings(aggregator="a@x.org", epsilon=10.0))
    assert len(warnings) == 2, warnings
    hour, day = warnings
    assert hour.startswith("Releases will pause for part of every span of 1 hour")
    assert "used up about 33.3 minutes (100 releases) into each such span" in hour
    assert "lower epsilon to 5.52 or raise that budget to 1810" in hour
    assert "used up about 13.3 hours (2400 releases) into each such span" in day


def test_a_release_larger_than_a_budget_is_said_to_publish_nothing():
    (warning,) = settings_warnings(Settings(aggregator="a@x.org", epsilon=8.0,
                                            budgets=[{"horizon_s": 0, "epsilon": 4.0}]))
    assert warning.startswith("Nothing will ever be published: each release spends epsilon 8")
    assert "at most 4 epsilon on any single instant" in warning


def test_sample_period_is_accepted_but_said_to_be_ignored(tmp_path):
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "a@x.org"\nsample_period_s = 0.01\n')
    s = load_settings(tmp_path, {})
    assert s.samples_per_window == 20  # whole seconds: the sample period changes nothing
    (warning,) = settings_warnings(s)
    assert "sample_period_s = 0.01 is ignored" in warning


# ---------------------------------------------------------------------------------------------------
# Issue 17: any file the TOML parser reads gets a sentence, never a traceback; SyftBox's own email rule
# ---------------------------------------------------------------------------------------------------
HOSTILE_TOML = {
    "array nested 5,000 deep": "monitors = " + "[" * 5000 + "]" * 5000,
    "table nested 5,000 deep": "x = " + "{a = " * 5000 + "1" + "}" * 5000,
    "array nested 40 deep (tomllib reads it)": "budgets = " + "[" * 40 + "]" * 40,
    "a 5,000-digit integer": "epsilon = " + "9" * 5000,
    "a 20,000-digit hexadecimal integer": "min_members = 0x" + "f" * 20000,
    "a huge integer inside a monitor": "monitors = [{name = \"m\", threshold = 0x" + "f" * 20000 + "}]",
    "a huge integer as a member": "members = [0x" + "f" * 20000 + "]",
    "a huge integer as its name": "monitors = [{name = 0x" + "f" * 20000 + "}]",
    "a 20,000-digit float (infinite)": "epsilon = 1" + "0" * 20000 + ".0",
    "a datetime aggregator": "aggregator = 1979-05-27T07:32:00Z",
    "not UTF-8": b"aggregator = \"\xff\xfe\"",
    "a NUL in members_file": 'members_file = "a\\u0000b"',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TOML))
def test_hostile_settings_files_get_a_sentence(tmp_path, name):
    text = HOSTILE_TOML[name]
    data = text if isinstance(text, bytes) else f'aggregator = "a@x.org"\n{text}\n'.encode()
    (tmp_path / "cpu_tracker.toml").write_bytes(data)
    with pytest.raises(SettingsError) as e:
        load_settings(tmp_path, {})
    message = str(e.value)
    assert message.endswith(".") and "\n" not in message and len(message) < 2000, message


@pytest.mark.parametrize("name", ["array nested 5,000 deep", "a 5,000-digit integer",
                                  "a huge integer inside a monitor"])
def test_hostile_settings_stop_the_app_with_one_line_not_a_traceback(tmp_path, name):
    (tmp_path / "cpu_tracker.toml").write_text(f'aggregator = "a@x.org"\n{HOSTILE_TOML[name]}\n')
    done = _run(_workspace(tmp_path), tmp_path, "--once")
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.stdout.count("cpu_tracker.toml") == 1


@pytest.mark.parametrize("env", ["[" * 5000 + "]" * 5000, "[" + "9" * 5000 + "]", '[{"horizon_s": 1e999}]'])
def test_hostile_json_in_the_environment_gets_a_sentence(tmp_path, env):
    with pytest.raises(SettingsError):
        load_settings(tmp_path, {"CPU_TRACKER_AGGREGATOR": "a@x.org", "CPU_TRACKER_BUDGETS": env})


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) and key.isascii() else json.dumps(key)


class Huge:
    """An integer of 5,000 hexadecimal digits, as hypothesis draws it (its repr must stay printable)."""

    def __repr__(self) -> str:
        return "Huge()"


def _toml(value) -> str:
    """TOML for a value hypothesis drew (inline arrays and tables; big integers in hexadecimal, as tomllib reads
    them whatever their size)."""
    if isinstance(value, Huge):
        return "0x" + "f" * 5000
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if value in (float("inf"), -float("inf")) \
            else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # date, time, datetime


def _toml_values():
    from hypothesis import strategies as st

    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
    scalars = st.one_of(
        st.integers(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.builds(Huge),
        st.sampled_from([0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 63, 10 ** 6, 10 ** 6 + 1]),
        st.floats(allow_nan=True, allow_infinity=True), st.booleans(), text,
        st.sampled_from(["a@x.org", "agg@example.org", "{a,b}@example.org", "*@x.org", "A@X.ORG", "auto", "member",
                         "aggregator", "both", "local", "secure", "cpu_day", "debug", "members.txt", ""]),
        st.datetimes(timezones=st.just(__import__("datetime").timezone.utc)), st.dates(),
    )
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "kind", "threshold", "epsilon", "horizon_s", "window", "x"]) | text, inner,
        max_size=4), max_leaves=12)


def _documents():
    from hypothesis import strategies as st

    keys = st.sampled_from(sorted(Settings.model_fields)) | st.text(min_size=1, max_size=12)
    return st.dictionaries(keys, _toml_values(), max_size=6).map(
        lambda d: {"aggregator": "agg@example.org", **d} if "aggregator" not in d else d)


def test_any_toml_document_gets_settings_or_a_sentence(tmp_path):
    """Whatever TOML hypothesis writes (every setting's name with any value: huge integers, NaN, datetimes, odd
    strings, nested arrays and tables), load_settings returns settings or raises SettingsError, one line that ends
    a sentence; nothing else escapes, nor from what the app does next with accepted settings (its warnings, the
    monitors' check)."""
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hyp_settings

    from shared.privacy.safezone import parse_monitors

    counts = {"accepted": 0, "refused": 0}

    @hyp_settings(max_examples=400, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_documents())
    def check(doc):
        text = "".join(f"{_toml_key(k)} = {_toml(v)}\n" for k, v in doc.items())
        (tmp_path / "cpu_tracker.toml").write_text(text, "utf-8")
        try:
            accepted = load_settings(tmp_path, {})
            counts["accepted"] += 1
            settings_warnings(accepted)  # what the app says next about them: sentences too
            for sentence in parse_monitors(accepted.monitors)[1]:
                assert "\n" not in sentence
        except SettingsError as e:
            counts["refused"] += 1
            assert str(e).endswith(".") and "\n" not in str(e), str(e)

    check()
    assert counts["accepted"] and counts["refused"] > 100, counts


@pytest.mark.parametrize("value, why", [
    ("{a,b}@example.org", "pattern characters"),
    ("{ab}@example.org", "pattern characters"),
    ("a@b", "SyftBox refuses it as an email"),
    ("a@localhost", "SyftBox refuses it as an email"),
    ("a..b@example.org", "SyftBox refuses it as an email"),
    ('"a b"@example.org', "one @, no spaces"),
    ("Agg@Example.ORG", "SyftBox writes it as 'Agg@example.org'"),
    ("a@xn--bcher-kva.example", "SyftBox writes it as 'a@bücher.example'"),
])
def test_the_aggregator_follows_syftbox_email_rule(tmp_path, value, why):
    """SyftBox names a datasite by its client config's ``email: EmailStr``, normalised: anything else names no
    datasite (or, with pattern characters, several on the newer server)."""
    (tmp_path / "cpu_tracker.toml").write_text(f"aggregator = {json.dumps(value)}\n")
    with pytest.raises(SettingsError, match="must be one exact datasite email") as e:
        load_settings(tmp_path, {})
    assert why in str(e.value) and str(e.value).endswith(".")


@pytest.mark.parametrize("value", ["agg@example.org", "a.b+c@sub.example.org", "o'neil@example.org", "ü@example.org",
                                   "Agg@example.org"])
def test_datasite_emails_syftbox_accepts_are_accepted(tmp_path, value):
    from pydantic import validate_email

    assert validate_email(value)[1] == value  # what SyftBox's client config would store
    (tmp_path / "cpu_tracker.toml").write_text(f"aggregator = {json.dumps(value)}\n")
    assert load_settings(tmp_path, {}).aggregator == value
