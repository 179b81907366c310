"""Settings and the app process: clear errors that name the setting, one instance per datasite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runner import acquire_lock
from shared.paths import Paths
from shared.settings import Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]
ROLE_MODULES = ("cpu_tracker_member.member", "cpu_tracker_aggregator.aggregator")  # as run.sh names them


def test_file_then_environment(tmp_path):
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "a@x.org"\nepsilon = 0.25\n')
    s = load_settings(tmp_path, {"CPU_TRACKER_INTERVAL_S": "30", "SYFTBOX_CPU_TRACKER_EPSILON": "0.75"})
    assert (s.aggregator, s.epsilon, s.interval_s, s.samples_per_window) == ("a@x.org", 0.75, 30.0, 300)
    s = load_settings(tmp_path, {"SYFTBOX_CPU_TRACKER_EPSILON": "0.75", "CPU_TRACKER_EPSILON": "1"})
    assert s.epsilon == 1.0  # CPU_TRACKER_ wins over SYFTBOX_CPU_TRACKER_


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
        ({}, 'aggregator = "not-an-email"\n', "must be an email"),
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

    from shared.runner import _guarded

    def member_loop():
        raise RuntimeError("boom")

    stop, failed = threading.Event(), []
    _guarded(member_loop, stop, failed, "member")()
    assert failed == ["member"] and stop.is_set()
    assert "member stopped by an unexpected error" in caplog.text and "boom" in caplog.text


def test_a_member_too_noisy_for_the_aggregator_is_warned(caplog):
    from cpu_tracker_member.member import warn_if_rejected

    warn_if_rejected(Settings(aggregator="a@x.org"))
    assert "exceeds max_noise_scale" not in caplog.text
    warn_if_rejected(Settings(aggregator="a@x.org", interval_s=1.0))  # 10 samples: scale 20 > 10
    assert "exceeds max_noise_scale" in caplog.text


def test_a_changed_settings_file_stops_the_run_for_a_reload(tmp_path, monkeypatch):
    """The README promises settings changes are picked up within SETTINGS_POLL_S (10 s)."""
    import threading

    import shared.runner as app

    monkeypatch.setattr(app, "SETTINGS_POLL_S", 0.05)
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "a@x.org"\n')
    stop, run_stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=app._watch, args=(tmp_path, app._settings_stamp(tmp_path), stop, run_stop))
    watcher.start()
    assert not run_stop.wait(0.3)  # unchanged: the run goes on
    (tmp_path / "cpu_tracker.toml").write_text('aggregator = "b@x.org"\nepsilon = 0.25\n')
    assert run_stop.wait(5)
    watcher.join(5)
