"""Permissions that fail closed, checked against syftbox 0.4.0's own server storage.

The relay here is syftbox 0.4.0's own ``FileStore`` (its SQLite rules table and permission engine, as the server runs
them); in front of it, ``Client`` plays one sync pass of the 0.4.0 client for the member's datasite, with the
client's own rules: an exact ``syftperm.yaml`` is validated with syftbox's ``SyftPermission.is_valid`` and not
uploaded when invalid (an error, retried at every pass, the relay keeping the old version); permission files go
first (``FileChangeInfo.get_priority``); every action is recorded in ``local_syncstate.json`` through syftbox's own
``LocalState``. The member is the real one (``run_member``), reading that record.

The promise, attacked with permission files of every name, place and state the server and client treat
differently: after the member's window and the client's next pass, **no one but the aggregator can download any
file the member published** (asked of the server's own permission engine, as an outsider), however the permission
files were written, emptied, broken or deleted before; and the member publishes again once they are safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
from pathlib import Path

import pytest
import yaml

from cpu_tracker_member.member import Member, run_member
from shared.logs import Problems
from shared.paths import Paths
from shared.permissions import ALL
from shared.settings import Settings
from tests.conftest import AGG, FakeClock, FakeWall

syftbox = pytest.importorskip("syftbox")
from fastapi import HTTPException  # noqa: E402  (syftbox's server raises these)
from loguru import logger  # noqa: E402
from syftbox.client.plugins.sync.local_state import LocalState  # noqa: E402
from syftbox.client.plugins.sync.types import SyncActionType, SyncStatus  # noqa: E402
from syftbox.lib.hash import hash_file  # noqa: E402
from syftbox.lib.permissions import PermissionType, SyftPermission  # noqa: E402
from syftbox.server.db.file_store import FileStore  # noqa: E402
from syftbox.server.settings import ServerSettings  # noqa: E402

logger.disable("syftbox")
ME, OUTSIDER = "me@example.org", "outsider@example.org"
SYNC_STATE = ("plugins", "local_syncstate.json")


class Relay:
    """syftbox 0.4.0's server storage: files, rules, and who may download what."""

    def __init__(self, root: Path):
        (root / "server").mkdir(parents=True, exist_ok=True)
        self.store = FileStore(ServerSettings(data_folder=root / "server"))

    def readable(self, rel: str, user: str) -> bool:
        try:
            self.store.get(Path(rel), user)
            return True
        except (HTTPException, ValueError):
            return False

    def has(self, rel: str) -> bool:
        return self.store.exists(Path(rel))


class Client:
    """One sync pass of the syftbox 0.4.0 client for the owner's own datasite (uploads and deletions)."""

    def __init__(self, data_dir: Path, email: str, relay: Relay):
        self.ds, self.email, self.relay = data_dir / "datasites", email, relay
        path = data_dir.joinpath(*SYNC_STATE)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.state = LocalState(path=path)
        self.state.load()
        self.refused: list[str] = []

    def sync(self) -> None:
        local = {}
        for dirpath, _, names in os.walk(self.ds / self.email):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file() and not name.endswith(".tmp"):  # the client's default _.syftignore: *.tmp
                    local[path.relative_to(self.ds)] = path
        known = {p for p in self.state.states if p.parts[0] == self.email}
        order = sorted(set(local) | known, key=lambda p: (0 if p.name == "syftperm.yaml" else
                                                           max(1, local[p].stat().st_size) if p in local else 1, p))
        for rel in order:
            current = hash_file(local[rel], root_dir=self.ds) if rel in local else None
            previous = self.state.states.get(rel)
            if current is None and previous is None or current and previous and current.hash == previous.hash:
                continue
            if current is None:
                self.relay.store.delete(rel, self.email)
                self.state.insert_synced_file(rel, None, SyncActionType.DELETE_REMOTE)
                continue
            action = SyncActionType.CREATE_REMOTE if previous is None else SyncActionType.MODIFY_REMOTE
            if SyftPermission.is_permission_file(rel) and not SyftPermission.is_valid(local[rel], local[rel].parent,
                                                                                        _print=False):
                self.refused.append(str(rel))
                self.state.insert_status_info(rel, SyncStatus.ERROR, "invalid permission file", action)
                continue
            try:
                exists = self.relay.has(str(rel))
                self.relay.store.put(rel, local[rel].read_bytes(), user=self.email,
                                     check_permission=PermissionType.WRITE if exists else PermissionType.CREATE)
            except Exception as e:  # noqa: BLE001  the server refuses (400) or fails on (500) an invalid *syftperm.yaml
                self.state.insert_status_info(rel, SyncStatus.ERROR, str(getattr(e, "detail", e)), action)
                continue
            self.state.insert_synced_file(rel, current, action)


class World:
    """A member datasite with the real member, its client and the relay."""

    def __init__(self, root: Path, *, sync_state: bool = True):
        self.paths = Paths(root / "data", ME)
        self.relay = Relay(root)
        self.client = Client(self.paths.data_dir, ME, self.relay)
        settings = Settings(aggregator=AGG, interval_s=20.0, budgets=({"horizon_s": 0, "epsilon": 1000.0},))
        self.member = Member(self.paths, settings, Problems(logging.getLogger("test.relay_perms")))
        if not sync_state:
            self.member.guard().sync_state_file = root / "no-client-record"
        self.wall, self.published = FakeWall(step=20.0), 0
        root, public = self.paths.my_datasite, self.paths.my_datasite / "public"  # as syftbox's create_datasite does
        public.mkdir(parents=True)
        (root / "syftperm.yaml").write_bytes(_dump([{"path": "**", "user": ME, "permissions": list(ALL)}]))
        (public / "syftperm.yaml").write_bytes(_dump([{"path": "**", "user": ME, "permissions": ["admin"]},
                                                      {"path": "**", "user": "*", "permissions": ["read"]}]))
        self.client.sync()

    def window(self, *, relay_up: bool = True) -> bool:
        """One member window (as run_member runs it), then one client pass (none while the relay is down). True if a
        report was published."""
        before = self.paths.report_file().read_bytes() if self.paths.report_file().exists() else None
        reads = iter([0.0, 37.5])
        run_member(self.member, threading.Event(), read=lambda: next(reads), wall=self.wall, clock=FakeClock(20.0),
                   once=True)
        if relay_up:
            self.client.sync()
        published = self.paths.report_file().exists() and self.paths.report_file().read_bytes() != before
        self.published += published
        return published

    def member_files_on_relay(self) -> list[str]:
        p = self.paths
        files = [p.report_file(), p.monitor_signals_file(), p.secure_join_file(), p.answers_file(), p.upload_file(1)]
        return [str(f.relative_to(p.datasites)) for f in files if self.relay.has(str(f.relative_to(p.datasites)))]

    def exposed(self) -> list[str]:
        """Member files on the relay that the outsider may download (the server's own check)."""
        return [rel for rel in self.member_files_on_relay() if self.relay.readable(rel, OUTSIDER)]

    def folder(self, where: str) -> Path:
        return {"root": self.paths.my_datasite, "app_data": self.paths.my_datasite / "app_data",
                "report": self.paths.report_dir(), "secure": self.paths.upload_dir()}[where]


def _dump(rules) -> bytes:
    return yaml.safe_dump(rules).encode()


GRANT = _dump([{"path": "**", "user": "*", "permissions": ["read"]}])
CONTENTS = {
    "grant everyone read": GRANT,
    "grant another email read": _dump([{"path": "**", "user": OUTSIDER, "permissions": ["read"]}]),
    "grant everyone admin": _dump([{"path": "**", "user": "*", "permissions": ["admin"]}]),
    "grant {useremail} folders": _dump([{"path": "{useremail}/**", "user": "*", "permissions": ["read"]}]),
    "grant ** before {useremail}": _dump([{"path": "**/{useremail}/**", "user": "*", "permissions": ["read"]}]),
    "grant app_data/{useremail}": _dump([{"path": "app_data/{useremail}", "user": "*", "permissions": ["read"]}]),
    "grant read as a bare string": b"- path: '**'\n  user: '*'\n  permissions: read\n",
    "grant with an upper-case permission": b"- path: '**'\n  user: '*'\n  permissions: [READ]\n",
    "owner only": _dump([{"path": "**", "user": ME, "permissions": ["admin", "read", "write", "create"]}]),
    "public/ only": _dump([{"path": "public/**", "user": "*", "permissions": ["read"]}]),
    "disallow everyone": _dump([{"path": "**", "user": "*", "permissions": ["read"], "type": "disallow"}]),
    "no rules": b"[]\n",
    "empty": b"",
    "comment only": b"# nothing here\n",
    "an unknown key": b"- path: '**'\n  user: '*'\n  permissions: [read]\n  note: hi\n",
    "an unknown permission": b"- path: '**'\n  user: '*'\n  permissions: [peek]\n",
    "a path above its folder": b"- path: '../**'\n  user: '*'\n  permissions: [read]\n",
    "a user that is not an email": b"- path: '**'\n  user: everyone\n  permissions: [read]\n",
    "not YAML": b"- path: '**'\n  user: [unclosed\n",
    "not UTF-8": b"- path: '**'\n  user: '\xff*'\n  permissions: [read]\n",
    "a mapping, not a list": b"path: '**'\nuser: '*'\n",
}
PUB_CONTENTS = {
    "grant everyone read": b"rules:\n- pattern: '**'\n  access: {read: ['*']}\n",
    "terminal": b"terminal: true\nrules:\n- pattern: '**'\n  access: {read: ['me@example.org']}\n",
    "owner only": b"terminal: false\nrules:\n- pattern: '**'\n  access: {admin: ['me@example.org']}\n",
    "empty": b"",
}
NAMES = ["syftperm.yaml", "notes.syftperm.yaml", "syft.pub.yaml"]
PLACES = ["root", "app_data", "report", "secure"]


def _contents(name: str) -> dict[str, bytes]:
    return PUB_CONTENTS if name == "syft.pub.yaml" else CONTENTS


SCENARIOS = [(n, c, p) for n in NAMES for c in _contents(n) for p in PLACES
             if not (p == "report" and n in ("syftperm.yaml", "syft.pub.yaml"))]  # the member's own: repaired (below)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    assert w.window() and w.exposed() == [] and w.relay.readable(w.member_files_on_relay()[0], AGG)
    return w


@pytest.mark.parametrize(("name", "content", "place"), SCENARIOS, ids=["-".join(s) for s in SCENARIOS])
def test_no_permission_file_of_any_name_or_state_exposes_a_published_file(world: World, name, content, place) -> None:
    """Written by another app (or the owner) where the member publishes, uploaded by the client or refused by it;
    then "fixed" by emptying it (which the client refuses to upload); then removed (and, for a file whose rules the
    relay keeps after its deletion, the folder's syftperm.yaml saved again, as the member's message asks; the member
    does that itself in its own folders). After every member window and client pass: nothing the member published is
    downloadable by an outsider; and the member publishes again within four windows."""
    folder = world.folder(place)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    target.write_bytes(_contents(name)[content])
    world.client.sync()
    for step in range(3):
        world.window()
        assert world.exposed() == [], f"after window {step + 1} with {target} = {content!r}"
    target.write_bytes(b"")  # "fixed" by emptying it: the client will not upload that
    world.client.sync()
    for _ in range(2):
        world.window()
        assert world.exposed() == []
    target.unlink()
    if name != "syftperm.yaml" and name.endswith("syftperm.yaml") and place in ("root", "app_data"):
        own = folder / "syftperm.yaml"  # what the member's message asks: the relay keeps the rules of the deleted file
        own.write_bytes((own.read_bytes() if own.exists() else b"[]\n") + b"# saved again\n")
    world.client.sync()
    resumed = [world.window() for _ in range(4)]
    assert world.exposed() == []
    assert resumed[-1], f"the member did not publish again after {target} was removed: {world.member.exposed}"


def test_the_leaks_are_real_on_the_relay(tmp_path: Path) -> None:
    """Not vacuous: each of these, with a member that does not check (publishing regardless), lets the outsider
    download the report from syftbox 0.4.0's own storage; the member withheld in each of them."""
    leaks = [("syftperm.yaml", "grant everyone read", "root"), ("notes.syftperm.yaml", "grant everyone read", "report"),
             ("syftperm.yaml", "grant another email read", "app_data"),
             ("syftperm.yaml", "grant everyone admin", "secure")]
    for i, (name, content, place) in enumerate(leaks):
        w = World(tmp_path / str(i))
        assert w.window()
        (w.folder(place)).mkdir(parents=True, exist_ok=True)
        (w.folder(place) / name).write_bytes(CONTENTS[content])
        w.client.sync()
        if place == "secure":  # a file there only matters once the member writes there
            rel = str(w.paths.upload_file(1).relative_to(w.paths.datasites))
            w.paths.upload_file(1).write_bytes(b"{}")
            w.client.sync()
            assert w.relay.readable(rel, OUTSIDER), (name, content, place)
            continue
        assert w.relay.readable(str(w.paths.report_file().relative_to(w.paths.datasites)), OUTSIDER), \
            (name, content, place)


def test_an_emptied_grant_keeps_the_old_grant_on_the_relay(world: World) -> None:
    """The FACTS.md finding, on syftbox's own storage: a root grant to everyone, then "fixed" by emptying the file:
    the client refuses the empty file, the relay keeps the grant. Counted as a grant until fixed for real."""
    root = world.folder("root") / "syftperm.yaml"
    original = root.read_bytes()
    root.write_bytes(GRANT)
    world.client.sync()
    assert not world.window() and world.exposed() == []
    root.write_bytes(b"# fixed?\n")
    world.client.sync()
    assert str(root.relative_to(world.paths.datasites)) in world.client.refused
    probe = world.paths.my_datasite / "public" / "probe.txt"  # a file the relay serves under the root grant
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("x")
    world.client.sync()
    assert world.relay.readable(str(probe.relative_to(world.paths.datasites)), OUTSIDER)  # the old grant holds
    assert not world.window() and world.exposed() == []
    assert "has not uploaded the version on disk yet, and will not while it is invalid" in world.member.exposed \
        or "empty or only comments" in world.member.exposed
    root.write_bytes(original)
    world.client.sync()
    assert world.window() and world.exposed() == []


def test_a_deleted_notes_syftperm_keeps_its_rules_until_the_member_rewrites_its_own(world: World, caplog) -> None:
    """``notes.syftperm.yaml`` granting everyone, in the report folder: its rules replace the member's first rule on
    the relay and stay after it is deleted (shown on the relay itself). The member withholds while they may apply,
    writes its own syftperm.yaml again (a dated comment changes its bytes, so the client uploads it and the relay
    replaces the folder's rules), and publishes once that upload is recorded."""
    notes = world.folder("report") / "notes.syftperm.yaml"
    notes.write_bytes(GRANT)
    world.client.sync()
    assert not world.window() and world.exposed() == []
    notes.unlink()
    world.client.sync()
    report_rel = str(world.paths.report_file().relative_to(world.paths.datasites))
    world.paths.report_file().write_bytes(b"{}")  # what a member that trusted the disk would publish now
    world.client.sync()
    assert world.relay.readable(report_rel, OUTSIDER), "the relay dropped the deleted file's rules by itself"
    world.paths.report_file().unlink()
    world.client.sync()
    results = [world.window() for _ in range(3)]
    assert world.exposed() == [] and results[-1], results
    assert b"# cpu_tracker: written again" in (world.folder("report") / "syftperm.yaml").read_bytes()


def test_an_edit_of_the_members_own_file_is_repaired_and_never_exposes(world: World) -> None:
    """The member's own syftperm.yaml in the report folder edited to grant everyone: the client uploads it, the
    member repairs it; what the relay held meanwhile is known by its hash, so the member waits for the repair's
    upload before publishing again."""
    own = world.folder("report") / "syftperm.yaml"
    own.write_bytes(GRANT)
    world.client.sync()
    assert world.exposed() != []  # the edit alone exposes the report already on the relay: the window withdraws it
    world.window()
    assert world.exposed() == []
    assert world.window() and world.exposed() == []


def _random_step(rng: random.Random, w: World) -> str:
    place = rng.choice(PLACES)
    folder = w.folder(place)
    name = rng.choice(NAMES + ["x.syftperm.yaml"])
    kind = rng.random()
    if kind < 0.5:
        folder.mkdir(parents=True, exist_ok=True)
        content = rng.choice(list(_contents(name if name == "syft.pub.yaml" else "syftperm.yaml").values()))
        (folder / name).write_bytes(content)
        return f"write {place}/{name}"
    if kind < 0.8:
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass
        return f"remove {place}/{name}"
    path = folder / "syftperm.yaml"  # the owner re-saves a syftperm.yaml (a changed comment)
    if path.is_file():
        path.write_bytes(path.read_bytes() + f"# saved {rng.random()}\n".encode())
    return f"re-save {place}/syftperm.yaml"


@pytest.mark.parametrize("seed", range(6))
def test_random_histories_of_permission_files_never_expose_a_published_file(tmp_path: Path, seed: int,
                                                                            long_run: bool) -> None:
    """Random histories (fixed seeds): a few writes, removals and re-saves of permission files of every name in
    every place, sometimes synced between them, then the member's window and the client's pass: no member file is
    ever downloadable by an outsider. Then everything removed and re-saved: the member publishes again."""
    rng = random.Random(seed)
    w = World(tmp_path)
    assert w.window()
    history = []
    for _ in range(60 if long_run else 20):
        for _ in range(rng.randint(1, 4)):
            history.append(_random_step(rng, w))
            if rng.random() < 0.5:
                w.client.sync()
                history.append("sync")
        w.window()
        history.append("window")
        assert w.exposed() == [], history[-12:]
    for place in PLACES:
        folder = w.folder(place)
        for name in NAMES + ["x.syftperm.yaml"]:
            if folder.is_dir() and (folder / name).exists() and not (place in ("root", "report") and
                                                                     name == "syftperm.yaml"):
                (folder / name).unlink()
        if place in ("root", "app_data"):  # the owner follows the message: save them again, after the removals
            (folder / "syftperm.yaml").write_bytes(CONTENTS["owner only"] + f"# {seed}\n".encode())
    w.client.sync()
    results = [w.window() for _ in range(4)]
    assert w.exposed() == [] and results[-1], (w.member.exposed, results)
    assert w.published >= 2


def test_the_record_is_syftbox_own_format(world: World) -> None:
    """The member reads what syftbox's own LocalState writes: the hash there is the sha256 of the relay's bytes."""
    rel = world.paths.report_dir() / "syftperm.yaml"
    state = LocalState(path=world.paths.data_dir.joinpath(*SYNC_STATE))
    state.load()
    entry = state.states[rel.relative_to(world.paths.datasites)]
    assert entry.hash == hashlib.sha256(rel.read_bytes()).hexdigest()
    assert world.relay.store.get_metadata(rel.relative_to(world.paths.datasites), ME).hash == entry.hash


def test_a_relay_outage_costs_a_member_at_most_one_release(world: World, caplog) -> None:
    """Issue 19: while the relay is down the client uploads nothing and only the newest report would reach it once
    back, so every release written meanwhile but the last is charged for nothing (11 in a 120 s outage at 20 s
    windows, before). The member reads the client's record: once the last report has not reached the relay, it
    spends nothing more until it has. Ten windows of outage cost one release; releases resume with the relay."""
    from shared.privacy.ledger import load_spends

    before = len(load_spends(world.paths.ledger_file))
    written = [world.window(relay_up=False) for _ in range(10)]
    assert written == [True] + [False] * 9
    assert len(load_spends(world.paths.ledger_file)) == before + 1
    said = [r.getMessage() for r in caplog.records if "has not reached the relay yet" in r.getMessage()]
    assert len(said) == 1 and f"{world.paths.sync_state_file} is an old record" in said[0]  # and what to do then
    world.client.sync()  # the relay is back: the one report written during the outage goes up
    assert [world.window() for _ in range(3)] == [True] * 3 and world.exposed() == []
    assert len(load_spends(world.paths.ledger_file)) == before + 4


def test_the_member_reads_whether_a_secure_upload_reached_the_relay(world: World) -> None:
    """Secure mode's per-round uploads (``r<round>.json``) are followed in the client's own record like the report:
    not there while the client has not uploaded them (the relay down), there once it has."""
    upload = world.paths.upload_file(7)
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(b'{"round": 7}')
    world.member.guard().refresh()
    assert world.member.upload_delivered(upload) is False
    world.client.sync()
    world.member.guard().refresh()
    assert world.member.upload_delivered(upload) is True
    upload.write_bytes(b'{"round": 7, "again": true}')  # a new version the relay has not got
    world.member.guard().refresh()
    assert world.member.upload_delivered(upload) is False
