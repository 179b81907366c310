"""Settings and the app process: clear errors that name the setting, one instance per datasite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runner import acquire_lock
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
    return subprocess.run([sys.executable, "-m", "shared.runner", *ROLE_MODULES, "--config", str(config), *args],
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

    from shared.worker import _guarded

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

    import shared.worker as app

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
