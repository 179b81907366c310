"""The process host's pieces, without starting the app: the client config read with the standard library (checked
against syftbox's own loader), the one file-stamp watcher, the supervisor's jobs on a clock the test drives, and what
each process imports (the supervisor the standard library only; a worker only the roles it runs)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.logs import Problems
from shared.paths import SETTINGS_FILE
from shared.host.runner import ClientConfigError, load_client_config, load_workspace
from shared.host.supervisor import (ENV_RETRY_S, WORKER_BACKOFF_S, Chore, CodeWatch, FileStamps, KeepWorker, PrepareEnv,
                                    WatchFiles)
from tests.localnet.demo import PACKAGES, copy_app

REPO = Path(__file__).resolve().parents[1]


# -- the client config -------------------------------------------------------------------------------------------
def syftbox_view(config: Path | None) -> tuple[Path, str, str]:
    from syftbox.lib import Client

    client = Client.load(config)
    return Path(client.workspace.data_dir), str(client.email), str(client.config.server_url)


def syft_crypto_keys_file(data_dir: Path, server_url: str, email: str) -> Path:
    """Where syft-crypto keeps a datasite's private keys: ``<data_dir>/../.syftbox/<8 hex of
    sha256("<server_url>::<email>")>/pvt.jwks.json``, with the server URL as the SyftBox client holds it."""
    partition = hashlib.sha256(f"{server_url}::{email}".encode()).hexdigest()[:8]
    return data_dir.parent / ".syftbox" / partition / "pvt.jwks.json"


@pytest.mark.parametrize("url", ["https://syftbox.net", "https://syftbox.net/", "HTTPS://SyftBox.NET",
                                 "https://syftbox.net:443", "http://127.0.0.1:8080", "https://relay.example.org/v1/"])
def test_the_key_folder_is_named_after_the_server_url_as_syftbox_holds_it(tmp_path, url):
    """However the server URL is written in config.json (case, default port, trailing slash), the private-key file is
    the one syft-crypto derives from the SyftBox client's own parsed URL, not from the text as written."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"email": "m@x.org", "server_url": url, "client_url": "http://127.0.0.1:2",
                                  "data_dir": str(tmp_path / "data")}))
    data_dir, email, server_url = syftbox_view(config)
    assert load_workspace(str(config)).private_keys_file == syft_crypto_keys_file(data_dir, server_url, email)


@pytest.mark.parametrize("layout", ["plain", "legacy_name", "sync_folder", "home", "relative", "from_env"])
def test_the_config_is_read_as_syftbox_reads_it(tmp_path, monkeypatch, layout):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    data: dict = {"email": "m@x.org", "server_url": "http://127.0.0.1:1", "client_url": "http://127.0.0.1:2",
                  "data_dir": str(tmp_path / "data")}
    name, given = "config.json", tmp_path / "config.json"
    if layout == "legacy_name":
        name = "client_config.json"  # config.json missing: syftbox falls back to the old name beside it
    elif layout == "sync_folder":
        data["sync_folder"] = data.pop("data_dir")
    elif layout == "home":
        data["data_dir"] = "~/SyftBox"
    elif layout == "relative":
        data["data_dir"] = "some/where"
    (tmp_path / name).write_text(json.dumps(data))
    if layout == "from_env":
        monkeypatch.setenv("SYFTBOX_CLIENT_CONFIG_PATH", str(given))
        given = None
    ours = load_client_config(None if given is None else str(given))
    data_dir, email, server_url = syftbox_view(given)
    assert (ours.data_dir, ours.email) == (data_dir, email) and ours.data_dir.is_absolute()
    # the private-key folder is named after the server URL as syftbox holds it, as syft-crypto names it
    assert ours.workspace().private_keys_file == syft_crypto_keys_file(data_dir, server_url, email)
    assert load_workspace(None if given is None else str(given)).private == ours.data_dir / "private" / "cpu_tracker"


@pytest.mark.parametrize("text, needle", [
    (None, "cannot read"),
    ("{not json", "cannot read"),
    ("[1, 2]", "holds no JSON object"),
    ('{"data_dir": "/tmp/x"}', "email must be the datasite's email, got None"),
    ('{"email": "not an email", "data_dir": "/tmp/x"}', "email must be the datasite's email"),
    ('{"email": "m@x.org", "data_dir": 3}', "data_dir must be a folder, got 3"),
])
def test_a_bad_config_is_one_error_that_names_the_file(tmp_path, text, needle):
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ClientConfigError, match=needle) as e:
        load_client_config(str(path))
    assert str(path) in str(e.value)


# -- what each process imports ---------------------------------------------------------------------------------
def new_modules(code: str, *args: str, cwd: Path = REPO) -> set[str]:
    """The modules that importing / running ``code`` adds to a fresh interpreter of the test env."""
    script = ("import json, sys\nbefore = set(sys.modules)\n" + code +
              "\nprint(json.dumps(sorted(set(sys.modules) - before)))")
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": os.environ.get("HOME", "")})
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_supervisor_imports_the_standard_library_only():
    modules = new_modules("import shared.host.runner, shared.host.supervisor, shared.host.envs")
    third_party = sorted({m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"shared"})
    assert not third_party, f"the supervisor imports {third_party}"
    # shared.atomic is in (the lock file's private folder, 0700 whatever the umask, is its rule): 0.1 MB
    assert not {"shared.settings", "shared.wire.schema", "typing", "dataclasses"} & modules


@pytest.mark.parametrize("role, other", [("member", "cpu_tracker_aggregator"), ("aggregator", "cpu_tracker_member")])
def test_a_worker_imports_only_the_roles_it_runs(tmp_path, role, other):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "email": "m@x.org"}))
    code = ("import os\nos.environ.update(CPU_TRACKER_AGGREGATOR='a@x.org', CPU_TRACKER_INTERVAL_S='1', "
            "CPU_TRACKER_TICK_S='1')\nfrom shared.host.worker import main\n"
            "assert main(sys.argv[1:], roles=['cpu_tracker_member.member', 'cpu_tracker_aggregator.aggregator']) == 0")
    packages = {m.split(".")[0] for m in new_modules(code, "--config", str(config), "--once", "--role", role,
                                                     cwd=tmp_path)}
    assert f"cpu_tracker_{role}" in packages and other not in packages


# -- the file-stamp watcher ----------------------------------------------------------------------------------------
def test_the_stamps_follow_files_added_removed_and_renamed_without_listing_every_poll(tmp_path):
    folder = copy_app(tmp_path / "app")
    stamps = FileStamps(folder, PACKAGES, extra=(SETTINGS_FILE,))
    first = stamps.read()
    assert "shared/host/runner.py" in first and "run.sh" in first and SETTINGS_FILE not in first
    (folder / "shared" / "new_module.py").write_text("x = 1\n")
    (folder / "shared" / "sub").mkdir()
    (folder / "shared" / "sub" / "deep.py").write_text("y = 2\n")
    (folder / SETTINGS_FILE).write_text('aggregator = "a@x.org"\n')
    second = stamps.read()
    assert {"shared/new_module.py", "shared/sub/deep.py", SETTINGS_FILE} <= second.keys()
    (folder / "shared" / "sub" / "deep.py").rename(folder / "shared" / "sub" / "renamed.py")
    (folder / "shared" / "new_module.py").unlink()
    third = stamps.read()
    assert "shared/sub/renamed.py" in third and not {"shared/sub/deep.py", "shared/new_module.py"} & third.keys()
    (folder / "shared" / "__pycache__").mkdir(exist_ok=True)
    (folder / "shared" / "__pycache__" / "x.py").write_text("")
    assert stamps.read() == third  # ignored

    listed = []
    stamps._list = (lambda real: lambda: (listed.append(1), real())[1])(stamps._list)
    (folder / "shared" / "host" / "runner.py").write_text("# edited in place\n")  # no folder changes: no listing
    assert stamps.read()["shared/host/runner.py"] != third["shared/host/runner.py"] and not listed


# -- the jobs ----------------------------------------------------------------------------------------------------
class FakeProc:
    """A worker process the test ends: ``poll()`` is None until ``exit(code)``."""

    pid = 4242

    def __init__(self):
        self.returncode = None
        self.terminated = False

    def exit(self, code: int) -> None:
        self.returncode = code

    def poll(self):
        return self.returncode

    def terminate(self) -> None:
        self.terminated = True
        self.returncode = -15

    def wait(self, timeout=None):
        return self.returncode


def test_a_dying_worker_is_started_again_later_and_later_until_it_runs_a_minute(caplog):
    caplog.set_level(logging.INFO)
    spawned: list[FakeProc] = []
    job = KeepWorker(lambda: spawned.append(FakeProc()) or spawned[-1], Problems(logging.getLogger("t")))
    now, delays = 0.0, []
    job.run(now)
    for _ in range(len(WORKER_BACKOFF_S) + 1):
        now += 3
        spawned[-1].exit(1)
        job.run(now)
        delays.append(job.due - now)
        now = job.due
        job.run(now)  # starts the next one
    assert delays == [*WORKER_BACKOFF_S, WORKER_BACKOFF_S[-1]]
    now += 61  # this one runs for more than a minute: healthy again, said once
    job.run(now)
    assert "the worker runs again" in caplog.text
    spawned[-1].exit(1)
    job.run(now + 1)
    assert job.due - (now + 1) == WORKER_BACKOFF_S[0]
    assert len(spawned) == len(WORKER_BACKOFF_S) + 2


def test_a_failing_chore_is_said_once_and_its_success_clears_it(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    flag = tmp_path / "ok"
    code = f"import os, sys; print('chore ran'); sys.exit(0 if os.path.exists({str(flag)!r}) else 3)"
    problems = Problems(logging.getLogger("t"))
    chore = Chore("env-record", [sys.executable, "-c", code], 10.0, 3600.0, problems, dict(os.environ), tmp_path)
    assert chore.due == 10.0
    for start in (10.0, 3610.0):
        chore.run(start)
        chore.proc.wait()
        chore.run(start + 1)
        assert chore.due == start + 3600.0  # timed from its start
    assert caplog.text.count("env-record failed (code 3): chore ran") == 1
    flag.touch()
    chore.run(7210.0)
    chore.proc.wait()
    chore.run(7211.0)
    assert "env-record" not in problems.active and "resolved: env-record" in caplog.text


def fake_run_sh(folder: Path, script: str) -> None:
    (folder / "run.sh").write_text(script)


def test_new_pins_build_their_environment_first_and_a_failed_build_is_retried_later(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = copy_app(tmp_path / "app")
    watch = CodeWatch(folder, PACKAGES)
    problems = Problems(logging.getLogger("t"))
    pins = PrepareEnv(folder, watch, problems, dict(os.environ))
    assert not pins.pending and pins.due == float("inf")
    fake_run_sh(folder, "echo building; exit 1\n")
    pins.request(5.0)
    assert pins.pending and pins.run(5.0) is None
    pins.build.wait()
    assert pins.run(6.0) is None and pins.due == 6.0 + ENV_RETRY_S
    assert "preparing the new environment failed (building)" in caplog.text
    fake_run_sh(folder, "echo /envs/env-new\n")
    pins.run(pins.due)
    pins.build.wait()
    assert pins.run(pins.due) == "update"
    assert "environment ready (/envs/env-new): restarting into the new version" in caplog.text


def test_the_watcher_asks_for_an_update_new_pins_or_a_new_worker(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = copy_app(tmp_path / "app")
    (folder / SETTINGS_FILE).write_text('aggregator = "a@x.org"\n')
    problems = Problems(logging.getLogger("t"))
    watch = CodeWatch(folder, PACKAGES, settle_s=1, extra=(SETTINGS_FILE,))
    worker = KeepWorker(FakeProc, problems)
    worker.run(0.0)
    first = worker.proc
    pins = PrepareEnv(folder, watch, problems, dict(os.environ))
    installed = [True]
    job = WatchFiles(watch, worker, pins, lambda: installed[0])

    def settle(now: float) -> str | None:
        assert job.run(now) is None  # seen, not yet still
        return job.run(now + 2)

    (folder / SETTINGS_FILE).write_text('aggregator = "a@x.org"\nepsilon = 4\n')
    assert settle(10.0) is None
    assert first.terminated and worker.proc is None and worker.due == 12.0  # a new worker at once, new settings
    assert "cpu_tracker.toml changed: starting the worker again" in caplog.text
    (folder / "pyproject.toml").write_text("# new pins\n")
    assert settle(20.0) is None and pins.pending  # the environment first
    (folder / "shared" / "host" / "runner.py").write_text("# new code\n")
    assert settle(30.0) is None  # still waiting for the environment of the new pins
    pins.due = float("inf")  # (no build under way)
    (folder / "shared" / "host" / "worker.py").write_text("# new code\n")
    assert settle(40.0) == "update"
    installed[0] = False
    assert job.run(50.0) == "removed"


def test_the_supervisor_steps_through_its_jobs_on_the_clock_it_is_given(tmp_path, monkeypatch):
    from shared.host.supervisor import Supervisor

    folder = copy_app(tmp_path / "app")
    monkeypatch.chdir(folder)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "email": "m@x.org"}))
    sup = Supervisor(["cpu_tracker_member.member"], ["--config", str(config)], clock=lambda: 0.0)
    sup.worker.spawn = FakeProc
    jobs = sup.jobs_for(load_client_config(str(config)).workspace(), 0.0)
    sup.jobs = [j for j in jobs if not isinstance(j, Chore)]  # (no records of this test in the real env root)
    assert sup.step(0.0) is None and isinstance(sup.worker.proc, FakeProc)
    (folder / "shared" / "paths.py").write_text("# new code\n")
    assert sup.step(2.0) is None and sup.step(4.0) == "update"
