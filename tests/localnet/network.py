"""A whole SyftBox 0.4.0 network on 127.0.0.1 (one relay server, one client per email), for the demo and the
end-to-end tests.

Standard library only: syftbox runs as subprocesses from the executables of a given venv
(``<venv>/bin/uvicorn`` and ``<venv>/bin/syftbox``, syftbox==0.4.0 with click<8.2).

Layout under ``root``::

    server/             SYFTBOX_DATA_FOLDER: snapshot/<email>/... (synced files), file.db* (SQLite, WAL), logs/
    <email>/config.json the client's --config
    <email>/data/       the client's --data-dir: datasites/, apps/, plugins/, logs/, private/ (never uploaded)
    logs/<name>.log     stdout+stderr of the server and of each client

Facts checked by running syftbox 0.4.0 here (Debian 12, Python 3.11):

- Server: ``SYFTBOX_DATA_FOLDER=<dir> uvicorn syftbox.server.server:app --host 127.0.0.1 --port P``. Auth is off
  by default (``SYFTBOX_AUTH_ENABLED=false``): a client registers and gets an access token without any e-mail.
  It answers ``GET /info`` with ``{"version": "0.4.0"}`` about 1-2 s after launch. It also reads ``server.env``
  from its cwd, so it runs with cwd = its own data folder.
- Client: ``syftbox client --email E --data-dir D --server URL --config C --no-open-dir --port Q < /dev/null``
  needs no TTY and no env var, on one condition: ``D`` must be missing or empty. A non-empty ``D`` without
  ``.metadata.json`` makes it prompt ("Found old SyftBox folder ... [y/n]") and exit 1 ("Aborted.") on a closed
  stdin; an unreachable server makes it retry silently for minutes. It reads ``client.env`` from its cwd.
  On SIGTERM it shuts down cleanly within about a second, but the apps it started keep running (orphans), so
  each client runs in its own session and is stopped by process group.
- Readiness: the client's own API, ``GET http://127.0.0.1:Q/sync/state?path_glob=<email>/syftperm.yaml``,
  lists that file with status "synced" once the first sync cycle (download everything, then upload) has
  uploaded the datasite's root permission file: 2-5 s after launch for a 2-3 client network.
- App scheduler: every 5 s it runs ``sh run.sh`` in each folder of ``D/apps/`` (symlinks followed) that it is not
  already running; it first chmods run.sh +x (in the source folder, for a symlinked app). cwd is the app folder
  (with a symlink, ``pwd`` prints the resolved target), stdin inherited, stdout+stderr to
  ``apps/<name>/logs/<name>.log`` (truncated at every start). It is a plain ``Popen`` (the client's process
  group, the client as parent): an app that exits 0 is never started again, a non-zero one 5 s later, and an
  app whose folder leaves ``apps/`` gets SIGTERM (``Popen.terminate``); nothing else signals apps.
  env is exactly PATH, HOME, LANG, SHELL, USER, TMP*, LC_ALL, DISPLAY when the client has them, every
  ``SYFTBOX_*`` variable of the client, and ``SYFTBOX_CLIENT_CONFIG_PATH=<the client's config.json>``; PATH is
  the client's minus entries containing pyenv, conda, env/bin, .virtualenvs or $VIRTUAL_ENV, so the venv that
  runs syftbox is not on it.
- ``syftbox app install <local folder> --config C`` works with no TTY (about 1 s): it only symlinks
  ``D/apps/<folder name>`` to the folder (no copy, no pre/post-install step). Clients that install the same
  folder by symlink share it, logs/<name>.log and any file the app writes next to run.sh included.
- Sync (1 s loop on each client): a file in ``datasites/A/app_data/x/`` whose syftperm.yaml grants read to B
  alone was on the server about 1 s after it was written and at B's ``datasites/A/app_data/x/`` after 1-2.1 s
  (creation or update alike), never reached C, and is stored in plain text on the server at
  ``server/snapshot/A/app_data/x/``. Files under ``D/private/`` (outside datasites/) are never uploaded.

Stopping: SIGTERM to every client's process group (that holds run.sh and its children), then to the server's,
SIGKILL after a grace period; then any process still carrying this network's tag variable
(``SYFTBOX_LOCALNET_ROOT=<root>``, which the scheduler passes on to apps because of its ``SYFTBOX_`` prefix) is
killed too, even one that left the process group. Matching on that tag, not on cwd or command line, spares
a user's shell sitting in a datasite folder or a ``tail -f`` of a log. Linux only (reads /proc).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

__all__ = ["Datasite", "LocalNetwork", "free_port"]

HOST = "127.0.0.1"
TAG_VAR = "SYFTBOX_LOCALNET_ROOT"
APP_COPY_IGNORE = shutil.ignore_patterns("logs", "__pycache__", ".venv", "*.pyc", ".git")

T = TypeVar("T")

# Talk to loopback directly, whatever proxy the environment names.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Datasite:
    """One client of the network. Paths are absolute; ``port`` is the client's own API port on 127.0.0.1."""

    email: str
    data_dir: Path
    config_path: Path
    port: int

    @property
    def datasites(self) -> Path:
        """``data_dir / "datasites"``: this client's copy of every datasite it may read, its own included."""
        return self.data_dir / "datasites"

    @property
    def apps(self) -> Path:
        """``data_dir / "apps"``: the folder the client's app scheduler runs apps from."""
        return self.data_dir / "apps"


class LocalNetwork:
    """A SyftBox relay server and one client per email, all on 127.0.0.1, all files under ``root``.

    ``root``: a missing or empty folder. ``venv_bin``: the bin/ folder of a venv holding syftbox==0.4.0 and
    uvicorn. ``log``: called with one line per milestone. ``client_env``: extra environment variables for the
    clients; the ``SYFTBOX_``-prefixed ones also reach the apps they start. Any ``SYFTBOX_*`` variable of the
    calling process is dropped, so the network does not inherit the caller's SyftBox settings.

    Use as a context manager (``with LocalNetwork(...) as net:``), or call start() and then stop().
    """

    def __init__(
        self,
        root: Path,
        venv_bin: Path,
        emails: list[str],
        *,
        log: Callable[[str], object] = print,
        client_env: Mapping[str, str] | None = None,
    ) -> None:
        if not emails or len(set(emails)) != len(emails):
            raise ValueError(f"emails must be non-empty and distinct: {emails!r}")
        self.root = Path(root).resolve()
        self.venv_bin = Path(venv_bin).absolute()
        self.emails = list(emails)
        self.log = log
        self.client_env = dict(client_env or {})
        self.server_data = self.root / "server"
        self.logs = self.root / "logs"
        self.server_port = 0
        self.sites: dict[str, Datasite] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- public API -------------------------------------------------------------------------------------

    @property
    def server_url(self) -> str:
        """The relay server's URL (known once start() has picked its port)."""
        return f"http://{HOST}:{self.server_port}"

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it answers HTTP; then start every client and wait until each has
        created its datasite and finished one sync cycle (see the module docstring). Fills ``self.sites``.

        Each of the two waits lasts at most ``timeout`` s, then raises TimeoutError; a process that exits
        raises RuntimeError. Either way everything started so far is stopped first.
        """
        if self._procs:
            raise RuntimeError("network already started")
        self._prepare_root()
        started = time.monotonic()
        try:
            self._start_server(timeout)
            self._start_clients(timeout)
        except BaseException:
            self.stop()
            raise
        self.log(f"localnet: {len(self.sites)} clients synced, {time.monotonic() - started:.1f} s after start")

    def install_app(
        self,
        app_src: Path,
        name: str = "cpu_tracker",
        *,
        emails: Iterable[str] | None = None,
        symlink: bool = True,
        files: Mapping[str, str] | None = None,
    ) -> None:
        """Install the app folder ``app_src`` (it must hold run.sh) as ``apps/<name>`` of the given clients (all
        by default). The clients' schedulers then start its run.sh within about 5 s.

        ``symlink=True`` does what ``syftbox app install <folder>`` does: a symlink to the folder, made by that
        very command when ``name`` is the folder's name. All clients then share one folder (its logs/ too).
        ``symlink=False`` gives each client its own copy (without logs/, __pycache__, .venv), moved into apps/
        in one step so the scheduler never sees half a copy. ``files`` (copies only): name -> text of extra
        files placed in each copy before it is moved in, e.g. a settings file.
        """
        src = Path(app_src).resolve()
        if not (src / "run.sh").is_file():
            raise FileNotFoundError(f"no run.sh in {src}")
        for email in self.emails if emails is None else emails:
            site = self.sites[email]
            dest = site.apps / name
            if dest.exists() or dest.is_symlink():
                raise FileExistsError(dest)
            if files and symlink:
                raise ValueError("extra files need symlink=False (a symlinked app folder is shared)")
            if symlink and name == src.name:
                self._cli_install(site, src)
            elif symlink:
                dest.symlink_to(src, target_is_directory=True)
            else:
                self._copy_app(src, dest, files or {})
            self.log(f"localnet: installed {src.name} as {dest}")

    def stop_server(self, grace: float = 10) -> None:
        """Stop the relay server only (SIGTERM, SIGKILL after ``grace`` s); the clients keep running and retry.
        Its data folder (snapshot/, file.db) stays, so start_server() brings the same relay back."""
        proc = self._procs.pop("server", None)
        if proc is not None:
            _stop_groups([proc], grace)
            self.log(f"localnet: server at {self.server_url} stopped")

    def start_server(self, timeout: float = 60) -> None:
        """Start the relay server again on the same port with the same data, after stop_server()."""
        if "server" in self._procs:
            raise RuntimeError("server already running")
        if not self.server_port:
            raise RuntimeError("start() the network first")
        self._start_server(timeout, port=self.server_port)

    def stop_client(self, email: str, grace: float = 10) -> None:
        """SIGTERM one client's own process (not its group: what ``kill -TERM <client>`` does; the apps it started
        are left to fend for themselves), SIGKILL after ``grace`` s. start_client() brings it back."""
        proc = self._procs.pop(email)
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.log(f"localnet: client {email} stopped")

    def start_client(self, email: str, timeout: float = 60) -> None:
        """Start a client stopped by stop_client() again, with the same data folder, config and port, and wait
        until it has synced."""
        if email in self._procs:
            raise RuntimeError(f"client {email} already running")
        site = self.sites[email]
        self._spawn(email, self._client_argv(site), site.data_dir.parent, self.client_env)
        self.wait_for(lambda: _client_synced(site), timeout, what=f"{email} to sync again")
        self.log(f"localnet: client {email} started again")

    def client_pid(self, email: str) -> int:
        """The pid of a running client."""
        return self._procs[email].pid

    def app_processes(self, email: str) -> dict[int, tuple[int, str]]:
        """The live processes that ``email``'s client (any run of it) started as apps, and their children:
        pid -> (parent pid, command line). Found by this network's tag and that client's config path in their
        environment, so processes orphaned by a stopped client count too."""
        config = os.fsencode(f"SYFTBOX_CLIENT_CONFIG_PATH={self.sites[email].config_path}")
        found = {}
        for pid in _tagged_pids(self._tag()):
            proc = Path("/proc") / str(pid)
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if config in environ and pid not in {p.pid for p in self._procs.values()} and stat[0] != "Z":
                found[pid] = (int(stat[1]), cmdline.strip())
        return found

    def server_files(self) -> Path:
        """The folder where the relay stores every uploaded file, as ``<email>/<path in that datasite>``."""
        return self.server_data / "snapshot"

    def server_db_files(self) -> list[Path]:
        """The server's SQLite database files that exist now (file.db and its -wal/-shm companions)."""
        return sorted(self.server_data.glob("file.db*"))

    def wait_for(self, predicate: Callable[[], T], timeout: float, interval: float = 0.5, what: str = "") -> T:
        """Call ``predicate`` every ``interval`` s until it returns something truthy, and return that.

        Raises TimeoutError naming ``what`` after ``timeout`` s, and RuntimeError (with the end of its log)
        as soon as the server or a client of this network has exited.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_dead()
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate!r}")
            time.sleep(interval)

    def stop(self, grace: float = 10) -> None:
        """Stop the clients, then the server: SIGTERM to each process group, SIGKILL to what is left after
        ``grace`` s; then kill any process still carrying this network's tag (an app's child that left the
        group). Idempotent; never raises for processes that are already gone.
        """
        clients = [p for name, p in self._procs.items() if name != "server"]
        _stop_groups(clients, grace)
        _stop_groups([p for name, p in self._procs.items() if name == "server"], grace)
        self._procs.clear()
        strays = _tagged_pids(self._tag())
        if strays:
            self.log(f"localnet: killing {len(strays)} stray processes: {strays}")
            _kill_pids(strays, grace)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- start ------------------------------------------------------------------------------------------

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if any(self.root.iterdir()):
            raise ValueError(f"root must be empty: {self.root}")
        self.logs.mkdir()
        self.server_data.mkdir()

    def _start_server(self, timeout: float, port: int | None = None) -> None:
        self.server_port = port or free_port()
        argv = [str(self.venv_bin / "uvicorn"), "syftbox.server.server:app", "--host", HOST]
        argv += ["--port", str(self.server_port)]
        self._spawn("server", argv, self.server_data, {"SYFTBOX_DATA_FOLDER": str(self.server_data)})
        self.wait_for(self._server_answers, timeout, what=f"the server to answer at {self.server_url}")
        self.log(f"localnet: server up at {self.server_url}, data in {self.server_data}")

    def _server_answers(self) -> bool:
        return _get_json(f"{self.server_url}/info") is not None

    def _start_clients(self, timeout: float) -> None:
        for email in self.emails:
            home = self.root / email
            home.mkdir()
            site = Datasite(email, home / "data", home / "config.json", free_port())
            self.sites[email] = site
            self._spawn(email, self._client_argv(site), home, self.client_env)
        self.wait_for(self._all_synced, timeout, what=f"{len(self.sites)} clients to finish a first sync")

    def _client_argv(self, site: Datasite) -> list[str]:
        argv = [str(self.venv_bin / "syftbox"), "client", "--email", site.email, "--data-dir", str(site.data_dir)]
        argv += ["--server", self.server_url, "--config", str(site.config_path)]
        return argv + ["--port", str(site.port), "--no-open-dir"]

    def _all_synced(self) -> bool:
        return all(_client_synced(site) for site in self.sites.values())

    def _spawn(self, name: str, argv: list[str], cwd: Path, extra_env: Mapping[str, str]) -> None:
        """Start ``argv`` in a new session (its own process group), stdin /dev/null, output to logs/<name>.log."""
        with open(self.logs / f"{name}.log", "ab") as out:
            self._procs[name] = subprocess.Popen(
                argv,
                cwd=cwd,
                env=self._env(extra_env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The caller's environment without its SYFTBOX_* variables, plus ``extra`` and this network's tag."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYFTBOX_")}
        env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        env.update(extra)
        env[TAG_VAR] = str(self.root)
        return env

    def _raise_if_dead(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}; end of its log:\n{tail}")

    # -- apps -------------------------------------------------------------------------------------------

    def _cli_install(self, site: Datasite, src: Path) -> None:
        argv = [str(self.venv_bin / "syftbox"), "app", "install", str(src), "--config", str(site.config_path)]
        done = subprocess.run(
            argv,
            cwd=site.data_dir.parent,
            env=self._env({}),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"syftbox app install failed for {site.email}:\n{output}")

    def _copy_app(self, src: Path, dest: Path, files: Mapping[str, str]) -> None:
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".staging-") as staging:
            copy = Path(staging) / dest.name
            shutil.copytree(src, copy, symlinks=True, ignore=APP_COPY_IGNORE)
            for name, text in files.items():
                (copy / name).write_text(text)
            copy.rename(dest)

    def _tag(self) -> bytes:
        return os.fsencode(f"{TAG_VAR}={self.root}")


# -- helpers ----------------------------------------------------------------------------------------------


def _get_json(url: str) -> object | None:
    """GET ``url`` and decode its JSON body; None if it cannot be reached or does not answer 200."""
    try:
        with _http.open(url, timeout=2) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def _client_synced(site: Datasite) -> bool:
    """True once the client's API reports its datasite's root syftperm.yaml as synced (uploaded)."""
    glob = urllib.parse.quote(f"{site.email}/syftperm.yaml")
    items = _get_json(f"http://{HOST}:{site.port}/sync/state?path_glob={glob}")
    return isinstance(items, list) and any(item.get("status") == "synced" for item in items)


def _stop_groups(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM the process group led by each of ``procs``; SIGKILL the groups still alive after ``grace`` s."""
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    if not _poll_until(lambda: not any(_group_alive(p) for p in procs), grace):
        for proc in procs:
            _signal_group(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def _group_alive(proc: subprocess.Popen[bytes]) -> bool:
    proc.poll()  # reap the leader, so that its zombie does not count
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _tagged_pids(tag: bytes) -> list[int]:
    """Pids of the live processes (other than this one) whose environment holds the ``tag`` entry."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, a zombie, or not ours
            continue
        if tag in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _kill_pids(pids: list[int], grace: float) -> None:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if _poll_until(lambda: not any(_pid_alive(pid) for pid in pids), grace):
            return


def _pid_alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def _poll_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` s have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
