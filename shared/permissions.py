"""Permission files: the ones the app writes for its folders, and the check, before each release or write, that no
permission file the relay honours lets anyone else read what the app puts there.

What the relay honours (syftbox 0.4.0, read in its code and checked on its own storage, ``tests/test_relay_perms.py``):

- **Any file whose name ends in ``syftperm.yaml``** is a permission file to the server (``file_store.py``:
  ``path.name.endswith(PERM_FILE)``), but its rules are stored under ``<folder>/syftperm.yaml`` whatever its name
  (``PermissionRule.permfile_path``), upserted at priorities 0..n-1: ``notes.syftperm.yaml`` *replaces the first n
  rules* of its folder's ``syftperm.yaml`` on the relay, and deleting it removes nothing (the delete looks for rules
  under its own name). Its rules stay until that folder's ``syftperm.yaml`` is uploaded again (or deleted). The
  client's own checks look only at files named exactly ``syftperm.yaml``, so it uploads any other such file as is.
- Rules of every permission file on a path are applied in database row order, so the most recently *written* file
  wins, whatever its depth: a parent grant written after the report folder's own file leaks the report.
- **A permission file the client will not upload stays old on the relay**: the 0.4.0 client validates an exact
  ``syftperm.yaml`` before upload; an emptied or comment-only file, a rule with an unknown key, an unknown
  permission, a path starting ``../`` or a user that is not an email or ``*`` is refused and retried forever, and
  the relay keeps enforcing the previous version.
- The newer (Go) client and server read ``syft.pub.yaml``: ``terminal: true`` in a parent overrides the files below
  it, and read entries holding ``* ? [ ]`` are patterns (``*@*`` is everyone).

So the check (``PermissionGuard.exposure``) reads, from the datasite root down to and inside each folder the app
writes, every file whose name ends in ``syftperm.yaml`` and every ``syft.pub.yaml``, and counts as a grant to
everyone: a rule that lets anyone but the allowed readers read (or administer) anything the app writes there; a file
that cannot be read, is not a regular file, is not UTF-8 or YAML, is empty or comment-only, or holds anything the
app does not know (fail closed: "unknown" is "everyone"); any file other than ``syftperm.yaml`` whose name ends in
``syftperm.yaml``; a terminal ``syft.pub.yaml`` above the folder; and **whatever the relay may still hold** that is
not known to be safe. What the relay holds comes from the 0.4.0 client's own record of each synced file,
``<data_dir>/plugins/local_syncstate.json`` (``syftbox/client/plugins/sync/local_state.py``): ``states[path].hash``
is the sha256 of the version the relay has, and ``status_info[path]`` the last action on the path and when. A
``syftperm.yaml`` whose relay version differs from the local file is judged by that version if the app has seen
its content (by hash), else it counts as a grant to everyone until the client has uploaded the local one; a file
ending in ``syftperm.yaml`` recorded after its folder's ``syftperm.yaml`` was last uploaded leaves its rules on the
relay, even deleted. Without that record (the Go client) the check falls back to what is on disk, remembering an
odd-named permission file it saw until the folder's ``syftperm.yaml`` changes after it (docs/permissions.md says
what this fallback cannot see).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import yaml
from wcmatch import fnmatch as wcfnmatch
from wcmatch import glob as wcglob

from shared.atomic import (ChangeCache, PrivateTreeError, atomic_write_bytes, check_trusted_file, describe,
                           read_regular)
from shared.paths import SYFT_PUB_FILE, SYFTPERM_FILE

ALL = ["admin", "create", "write", "read"]
MAX_PERM_FILE_BYTES = 1 << 20
MAX_SYNC_STATE_BYTES = 256 << 20  # the 0.4.0 client's record of every file it syncs: tens of MB at 10,000 members
# A stamp whose st_ctime_ns is this close to now is not trusted to change with the next write: the kernel stamps
# ctime from a coarse clock (one tick, 1-10 ms), so a second write within that tick can leave every stamp as it was
# (git's "racily clean" index entries). Such a file or folder is read again next period instead of kept.
RACY_NS = 2_000_000_000
RESET_MARK = b"# cpu_tracker: written again so that the relay drops rules another permission file left: "


def is_permission_name(name: str) -> bool:
    """Whether a file of this name is a permission file to some SyftBox server (0.4.0: any name ending in
    ``syftperm.yaml``; the Go server: ``syft.pub.yaml``)."""
    return name.endswith(SYFTPERM_FILE) or name == SYFT_PUB_FILE


# ---------------------------------------------------------------------------------------------------
# The files the app writes
# ---------------------------------------------------------------------------------------------------
def syftperm_rules(owner: str, readers: Sequence[str]) -> list[dict]:
    """Rules for ``syftperm.yaml``: nobody but ``owner`` (everything) and ``readers`` (read only)."""
    rules = [
        {"path": "**", "user": "*", "permissions": list(ALL), "type": "disallow"},
        {"path": "**", "user": owner, "permissions": list(ALL)},
    ]
    rules += [{"path": "**", "user": r, "permissions": ["read"]} for r in readers if r != owner]
    return rules


def syft_pub(readers: Sequence[str]) -> dict:
    """Content of ``syft.pub.yaml`` granting read to ``readers`` (``"*"``: everyone)."""
    return {"terminal": True, "rules": [{"pattern": "**", "access": {"admin": [], "write": [], "read": list(readers)}}]}


def permission_files(owner: str, readers: Sequence[str]) -> dict[str, bytes]:
    """File name -> exact bytes of both permission files."""
    return dict(_permission_files(owner, tuple(readers)))


@lru_cache(maxsize=16)  # checked every window / tick: dump the YAML once, not every time
def _permission_files(owner: str, readers: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    return (
        (SYFTPERM_FILE, yaml.safe_dump(syftperm_rules(owner, readers), sort_keys=False).encode()),
        (SYFT_PUB_FILE, yaml.safe_dump(syft_pub(readers), sort_keys=False).encode()),
    )


def ensure_permissions(folder: Path, owner: str, readers: Sequence[str], *, reset: bool = False) -> list[str]:
    """Create ``folder`` and (re)write its permission files where they differ from what they must be. Returns the
    names of the files that were missing or changed (empty when all was in order).

    ``reset`` writes ``syftperm.yaml`` again with a dated comment (``RESET_MARK``) so that its bytes change: the
    client uploads it and the relay replaces the folder's rules, dropping those another ``*syftperm.yaml`` left
    behind. A file that is ours plus that comment is in order."""
    folder.mkdir(parents=True, exist_ok=True)
    fixed = []
    for name, data in permission_files(owner, readers).items():
        try:
            current = read_regular(folder / name, len(data) + len(RESET_MARK) + 64)
        except OSError:  # missing, or not a regular file (a FIFO, a folder, a symlink): replaced
            current = None
        wanted = data
        if name == SYFTPERM_FILE and reset:
            wanted = data + RESET_MARK + datetime.now().astimezone().isoformat(timespec="seconds").encode() + b"\n"
        elif current is not None and _ours(current, data):
            continue
        atomic_write_bytes(folder / name, wanted)
        fixed.append(name)
    return fixed


def _ours(current: bytes, data: bytes) -> bool:
    rest = current[len(data):]
    return current.startswith(data) and (not rest or (rest.startswith(RESET_MARK) and rest.count(b"\n") == 1
                                                      and rest.endswith(b"\n")))


# ---------------------------------------------------------------------------------------------------
# What a permission file grants (pure)
# ---------------------------------------------------------------------------------------------------
_SYFTPERM_KEYS = {"path", "user", "permissions", "type"}
_SYFTPERM_PERMS = {"read", "create", "write", "admin"}
_GRANTS_READ = {"read", "admin"}  # 0.4.0: read is read, admin is everything; write and create need read
_PUB_KEYS, _PUB_RULE_KEYS, _PUB_ACCESS = {"terminal", "rules"}, {"pattern", "access"}, ("admin", "write", "read")
_GLOB = set("*?[]{}")  # a user entry holding one of these is a pattern to the Go server
_FLAGS = wcfnmatch.DOTMATCH | wcfnmatch.IGNORECASE  # wider than either server's matching: fail closed
EMAIL_TEMPLATE = "{useremail}"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster than safe_load, the same constructor


@dataclass(frozen=True)
class Rule:
    number: int
    pattern: str
    users: tuple[str, ...]
    grants: tuple[str, ...]  # of what lets someone read: "read", "admin" (0.4.0); "admin", "write", "read" (Go)

    def words(self) -> str:
        return f"rule {self.number} (path {self.pattern!r}, users {list(self.users)!r}, grants {list(self.grants)!r})"


@dataclass(frozen=True)
class PermFile:
    """What one permission file says, as far as reading goes: its rules that grant read, whether it is terminal, and
    why it cannot be understood (``unknown``: then it counts as a grant to everyone)."""

    rules: tuple[Rule, ...] = ()
    terminal: bool = False
    unknown: str | None = None


def parse_permission_file(name: str, data: bytes) -> PermFile:
    """Read ``data`` as the permission file ``name`` (``syft.pub.yaml``, or any name ending in ``syftperm.yaml``).
    Anything not understood makes the whole file ``unknown``."""
    if len(data) > MAX_PERM_FILE_BYTES:
        return PermFile(unknown="is larger than 1 MiB")
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=_LOADER)  # as the server reads it: UTF-8, then safe YAML
    except UnicodeDecodeError:
        return PermFile(unknown="is not UTF-8")
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        return PermFile(unknown=f"is not valid YAML ({e.__class__.__name__})")
    if doc is None:
        return PermFile(unknown="is empty or only comments, which the SyftBox client refuses to upload (the relay "
                                "keeps its previous version)")
    try:
        return _parse_pub(doc) if name == SYFT_PUB_FILE else _parse_syftperm(doc)
    except _Unknown as e:
        return PermFile(unknown=f"cannot be understood ({e})")


class _Unknown(ValueError):
    pass


def _strings(value, what: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _Unknown(f"{what} is not text or a list of text")
    return tuple(values)


def _parse_syftperm(doc) -> PermFile:
    if not isinstance(doc, list):
        raise _Unknown("it is not a list of rules")
    rules = []
    for number, rule in enumerate(doc, start=1):
        if not isinstance(rule, dict):
            raise _Unknown(f"rule {number} is not a mapping")
        extra = sorted(map(str, set(rule) - _SYFTPERM_KEYS))
        if extra:
            raise _Unknown(f"rule {number} has key {extra[0]!r}, which the app does not know")
        pattern, user = rule.get("path"), rule.get("user")
        if not isinstance(pattern, str) or not isinstance(user, str):
            raise _Unknown(f"rule {number} has no text path or user")
        perms = {p.lower() for p in _strings(rule.get("permissions"), f"rule {number} permissions")}
        if perms - _SYFTPERM_PERMS:
            raise _Unknown(f"rule {number} has permission {sorted(perms - _SYFTPERM_PERMS)[0]!r}")
        kind = rule.get("type", "allow")
        if kind not in ("allow", "disallow"):
            raise _Unknown(f"rule {number} has type {kind!r}")
        grants = tuple(sorted(perms & _GRANTS_READ))
        if kind == "allow" and grants:  # a disallow rule only takes away
            rules.append(Rule(number, pattern, (user,), grants))
    return PermFile(tuple(rules))


def _parse_pub(doc) -> PermFile:
    if not isinstance(doc, dict):
        raise _Unknown("it is not a mapping")
    extra = sorted(map(str, set(doc) - _PUB_KEYS))
    if extra:
        raise _Unknown(f"it has key {extra[0]!r}, which the app does not know")
    terminal = doc.get("terminal", False)
    if not isinstance(terminal, bool):
        raise _Unknown(f"terminal is {terminal!r}, not true or false")
    raw_rules = doc.get("rules") or []
    if not isinstance(raw_rules, list):
        raise _Unknown("rules is not a list")
    rules = []
    for number, rule in enumerate(raw_rules, start=1):
        if not isinstance(rule, dict) or set(rule) - _PUB_RULE_KEYS:
            raise _Unknown(f"rule {number} is not a mapping of pattern and access")
        pattern, access = rule.get("pattern", "**"), rule.get("access") or {}
        if not isinstance(pattern, str) or not isinstance(access, dict) or set(access) - set(_PUB_ACCESS):
            raise _Unknown(f"rule {number} has a pattern or access the app does not know")
        users: dict[str, str] = {}
        for kind in _PUB_ACCESS:
            for user in _strings(access.get(kind) or [], f"rule {number} access.{kind}"):
                users.setdefault(user, kind)
        if users:
            rules.append(Rule(number, pattern, tuple(users), tuple(sorted(set(users.values())))))
    return PermFile(tuple(rules), terminal)


def rule_readers(rule: Rule, folder: tuple[str, ...]) -> set[str]:
    """Who ``rule`` (in a permission file of some folder) lets read something inside ``folder`` (given relative to
    the permission file's folder): the users it names (``*`` and patterns stand for everyone), for a path pattern
    that can match a path inside ``folder``. ``{useremail}`` (0.4.0: the reader's own email) counts as one reader only
    where it is a whole path component that ``folder`` names; anywhere else it stands for everyone."""
    out: set[str] = set()
    for user in rule.users:
        pattern = rule.pattern
        if EMAIL_TEMPLATE in pattern:
            if user == "*":
                named = _template_reader(pattern, folder)
                if named is None:
                    out |= {"*"} if _reaches(pattern.replace(EMAIL_TEMPLATE, "*"), folder) else set()
                    continue
                if "@" not in named:  # no one's email: every SyftBox user's has an @
                    continue
                user, pattern = named, pattern.replace(EMAIL_TEMPLATE, wcglob.escape(named))
            else:
                pattern = pattern.replace(EMAIL_TEMPLATE, wcglob.escape(user))
        if _reaches(pattern, folder):
            out.add(user)
    return out


def _template_reader(pattern: str, folder: tuple[str, ...]) -> str | None:
    parts = pattern.lstrip("/").split("/")
    where = [i for i, part in enumerate(parts) if EMAIL_TEMPLATE in part]
    first = where[0]
    if any(parts[i] != EMAIL_TEMPLATE for i in where) or any("**" in p for p in parts[:first]) or first >= len(folder):
        return None
    return folder[first]


def _reaches(pattern: str, folder: tuple[str, ...]) -> bool:
    """Whether ``pattern`` can match some path strictly inside ``folder`` (both relative to the permission file's
    folder). An over-approximation of both servers' matching: ``**`` anywhere, a brace or an escape counts as
    matching; components are compared case-insensitively, with dot files matched."""
    if "{" in pattern or "\\" in pattern:
        return True
    parts = pattern.lstrip("/").split("/")
    for i, part in enumerate(parts):
        if "**" in part or i >= len(folder):
            return True
        if not wcfnmatch.fnmatch(folder[i], part, flags=_FLAGS):
            return False
    return False  # the pattern ends at the folder or above it: it names no file inside


def _outsider(user: str, allowed: frozenset[str]) -> bool:
    return user not in allowed or bool(_GLOB & set(user))


def exposure(pf: PermFile, folder: tuple[str, ...], allowed: frozenset[str], *, above: bool = True) -> str | None:
    """Why ``pf`` (in a folder at or above the app's folder ``folder``, given relative to it) could let someone not
    in ``allowed`` read what the app writes there; None when it cannot. ``above``: the file lies above all of the
    app's own folders (only there is ``terminal: true`` someone else's: it would override the app's own files)."""
    if pf.unknown:
        return f"{pf.unknown}, so what it grants is unknown: fix it or remove it"
    if pf.terminal and folder and above:
        return ("has terminal: true, which makes the newer SyftBox server ignore the permission files below it; set "
                "terminal: false (or remove the file)")
    for rule in pf.rules:
        others = sorted(u for u in rule_readers(rule, folder) if _outsider(u, allowed))
        if others:
            return (f"has {rule.words()}, which lets {others!r} read what the app writes in "
                    f"{'/'.join(folder) or 'this folder'}; remove that rule or narrow it so that it does not cover it")
    return None


# ---------------------------------------------------------------------------------------------------
# What the relay holds: the 0.4.0 client's record of each synced file
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Synced:
    """What the client recorded for one permission file: the hash of the version the relay holds (None: none), and
    its last action on the path, with when (None: none recorded)."""

    hash: str | None
    status: str | None
    action: str | None
    at: datetime | None


UPLOADED = {"CREATE_REMOTE", "MODIFY_REMOTE", "DELETE_REMOTE"}


def parse_sync_state(raw: bytes, datasite: str, watch: Callable[[str], bool] = frozenset().__contains__
                     ) -> dict[tuple[str, ...], dict[str, Synced]] | None:
    """The permission files (and the files whose names ``watch`` accepts) of ``datasite`` in the client's
    ``local_syncstate.json``, by folder (relative to the datasite) and name; None when the file is not the 0.4.0
    client's record (its size and types are not trusted)."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("states", {}), dict) \
            or not isinstance(doc.get("status_info", {}), dict):
        return None
    hashes: dict[str, str | None] = {}
    infos: dict[str, tuple] = {}
    for key, entry in doc.get("states", {}).items():
        if _ours_perm(key, datasite, watch):
            h = entry.get("hash") if isinstance(entry, dict) else None
            hashes[key] = h if isinstance(h, str) else "?"  # something is there, of unknown content
    for key, entry in doc.get("status_info", {}).items():
        if _ours_perm(key, datasite, watch):
            infos[key] = _status(entry)
    out: dict[tuple[str, ...], dict[str, Synced]] = {}
    for key in hashes.keys() | infos.keys():
        parts = tuple(p for p in key.split("/") if p)[1:]
        status, action, at = infos.get(key, (None, None, None))
        out.setdefault(parts[:-1], {})[parts[-1]] = Synced(hashes.get(key), status, action, at)
    return out


def _ours_perm(key, datasite: str, watch: Callable[[str], bool]) -> bool:
    if not (isinstance(key, str) and key.startswith(datasite + "/")):
        return False
    name = key.rsplit("/", 1)[-1]
    return is_permission_name(name) or watch(name)


def _status(entry) -> tuple:
    if not isinstance(entry, dict):
        return ("?", None, None)
    status, action, at = entry.get("status"), entry.get("action"), entry.get("timestamp")
    try:
        when = datetime.fromisoformat(at) if isinstance(at, str) else None
    except ValueError:
        when = None
    return (status if isinstance(status, str) else "?", action if isinstance(action, str) else None, when)


# ---------------------------------------------------------------------------------------------------
# The check, with its caches
# ---------------------------------------------------------------------------------------------------
FORGET_EVERY = 16  # periods: a kept verdict not asked for in this many is forgotten (each cohort keys its own)


@dataclass
class PermissionGuard:
    """Checks, before the app writes into one of its folders, every permission file that could let anyone but the
    allowed readers read it there: on disk, and what the relay holds (module docstring). Caches each folder's listing
    (its permission files' names by the folder's stamp; their stamps taken once per ``refresh`` period), each file's
    reading (by its stamp), every content it has read (by hash: to judge a version the relay still holds) and each
    safe verdict, across periods, with everything it was decided from: the stamps (inode, device, size, mtime, ctime,
    mode, owner) of every permission file in every folder from the datasite down to the folder, whether each of those
    folders exists, and the client's record of each. A period re-stamps each folder once and keeps a verdict only when
    all of that is as it was; ctime, which a write or ``utime`` always moves and no user can set, catches a rewrite in
    place that restores mtime and size (``RACY_NS``: unless its stamp was too recent to trust). A verdict that finds a
    problem is decided again every period. Paths are kept as text inside: at 10,000 inbox folders a tick,
    ``pathlib`` was most of the cost."""

    datasite: Path  # the owner's own datasite folder: datasites/<email>
    sync_state_file: Path | None = None  # <data_dir>/plugins/local_syncstate.json
    watch: Callable[[str], bool] = frozenset().__contains__  # other files ``delivered`` may be asked about, by name
    _listing: dict[str, tuple] = field(default_factory=dict)
    _files: dict[str, tuple] = field(default_factory=dict)
    _known: dict[str, PermFile] = field(default_factory=dict)
    _sync: ChangeCache = field(default_factory=ChangeCache)  # the client's sync record, parsed
    _odd_seen: dict[str, float] = field(default_factory=dict)
    _uploaded: dict[str, datetime] = field(default_factory=dict)
    _memo: dict[str, object] = field(default_factory=dict)
    _verdicts: dict[tuple, tuple] = field(default_factory=dict)  # key -> (verdict, what it was decided from)
    _judged: dict[tuple, int] = field(default_factory=dict)  # key -> the period it was last judged in (an int: no new
    #                                                          object per folder per period for the garbage collector)
    _noted: set[tuple[str, ...]] = field(default_factory=set)
    _racy: set[str] = field(default_factory=set)  # folders listed this period with a file stamp too recent to trust
    _period: int = 0
    _once: dict[str, object] = field(default_factory=dict)  # what is worked out once a period ("sync", "distrust")
    _evictions: int = 0  # contents forgotten from ``_known``: a kept verdict may have relied on one
    _rels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # folder -> its parts below the datasite
    _listed: dict[str, dict] = field(default_factory=dict)  # folder -> its last listing

    def refresh(self) -> None:
        """Start a new period (call once per window or tick): every folder is stamped again, once, and a verdict is
        kept only while all it was decided from is unchanged. A folder is listed, and a folder judged for given
        readers, at most once a period."""
        self._memo.clear()
        self._once.clear()
        self._noted.clear()
        self._racy.clear()
        self._period += 1
        if self._period % FORGET_EVERY == 0:  # a verdict nobody asked for lately (an old cohort's epoch folder) goes
            stale = [k for k, p in self._judged.items() if p < self._period - FORGET_EVERY]
            for key in stale:
                self._judged.pop(key, None), self._verdicts.pop(key, None)

    def __post_init__(self) -> None:
        self._root = os.fspath(self.datasite).rstrip("/")
        self._owner = self.datasite.name

    def _rel(self, path) -> tuple[str, ...]:
        text = os.fspath(path)
        rel = self._rels.get(text)
        if rel is None:
            if text == self._root:
                rel = ()
            elif not text.startswith(self._root + "/"):
                raise ValueError(f"{text} is not inside {self._root}")
            else:
                rel = tuple(p for p in text[len(self._root) + 1:].split("/") if p)
            if len(self._rels) >= 1 << 18:
                self._rels.clear()
            self._rels[text] = rel
        return rel

    def _join(self, rel: tuple[str, ...]) -> str:
        return "/".join((self._root, *rel))

    def exposure(self, folder: Path | str, allowed: Iterable[str], *, top: Path | None = None) -> str | None:
        """Why what the app writes in ``folder`` (inside ``datasite``) could be read by someone not in ``allowed``
        (the owner is always allowed): the file, the rule and what to change; None when nothing could. ``top``: the
        app's own folder that holds ``folder`` (default: ``folder`` itself), whose own files are the app's."""
        allowed = frozenset(allowed) | {self._owner}
        rel = self._rel(folder)
        own = len(self._rel(top)) if top is not None else len(rel)
        key = (rel, allowed, own)
        kept = self._verdicts.get(key)
        if kept is not None and self._judged.get(key) == self._period:
            return kept[0]
        distrust = self._distrust_this_period()
        if distrust is not None:  # fail closed: a forged record could hide what the relay holds
            self._verdicts[key] = (distrust, None)
            self._judged[key] = self._period
            return distrust
        sync = self._sync_this_period()
        if kept is not None and kept[1] is not None and self._unchanged(rel, kept[1], sync):
            self._judged[key] = self._period
            return None
        verdict = self._exposure(rel, allowed, own, sync)
        self._verdicts[key] = (verdict, self._decided_from(rel, sync) if verdict is None else None)
        self._judged[key] = self._period
        return verdict

    def _decided_from(self, rel: tuple[str, ...], sync) -> tuple | None:
        """What a safe verdict on ``rel`` was just decided from (this period's listing of each folder on the way and
        the client's record of it); None when one of them is too recent to trust next period."""
        folders = tuple(self._join(rel[:depth]) for depth in range(len(rel) + 1))
        if any(f in self._racy for f in folders):
            return None
        listings = tuple(self._list(f) for f in folders)
        synced = None if sync is None else tuple(sync.get(rel[:depth]) for depth in range(len(rel) + 1))
        return folders, listings, synced, self._evictions

    def _unchanged(self, rel: tuple[str, ...], inputs: tuple, sync) -> bool:
        """Whether everything a kept verdict on ``rel`` was decided from is as it was (``_decided_from``)."""
        folders, listings, synced, evictions = inputs
        if evictions != self._evictions or (synced is None) != (sync is None):
            return False
        if sync is not None:
            self._note(rel, sync)
            for depth, was in enumerate(synced):
                if sync.get(rel[:depth]) != was:
                    return False
        for folder, was in zip(folders, listings):
            now = self._list(folder)
            if now is not was and now != was:
                return False
        return True

    def _note(self, rel: tuple[str, ...], sync) -> None:
        """Every folder on the way, even past a problem: what the record holds now is gone next time."""
        for depth in range(len(rel) + 1):
            if rel[:depth] not in self._noted:
                self._noted.add(rel[:depth])
                self._note_uploads(self._join(rel[:depth]), sync.get(rel[:depth], {}))

    def _once_a_period(self, name: str, compute):
        if name not in self._once:
            self._once[name] = compute()
        return self._once[name]

    def _distrust_this_period(self) -> str | None:
        """Why the client's record of what the relay holds cannot be trusted (another local user could have written
        it, so it could hide what the relay holds), checked once a period; None when it can, or there is none."""
        return self._once_a_period("distrust", self._distrust)

    def _distrust(self) -> str | None:
        if self.sync_state_file is None:
            return None
        try:
            check_trusted_file(self.sync_state_file)
        except PrivateTreeError as e:
            return f"the SyftBox client's record of what the relay holds: {e}, so it cannot tell what the relay holds"
        except OSError as e:
            return f"the SyftBox client's record of what the relay holds cannot be checked ({e})"
        return None

    def _sync_this_period(self):
        """The client's record as this period sees it (read once a period: one snapshot for every folder)."""
        return self._once_a_period("sync", self._sync_view)

    def _exposure(self, rel: tuple[str, ...], allowed: frozenset[str], own: int, sync) -> str | None:
        if sync is not None:
            self._note(rel, sync)
        for depth in range(len(rel) + 1):
            problem = self._folder_problem(self._join(rel[:depth]), rel[:depth], rel[depth:], allowed, sync,
                                           above=depth < own)
            if problem is not None:
                return problem
        return None

    def needs_reset(self, folder: Path) -> bool:
        """True when the relay may still apply rules that a (now removed) ``*syftperm.yaml`` left in ``folder``, which
        only a new upload of its ``syftperm.yaml`` clears (``ensure_permissions(..., reset=True)``)."""
        rel = self._rel(folder)
        here = self._join(rel)
        listing = self._list(here)
        if not isinstance(listing, dict) or any(_odd(n) for n in listing) or self._distrust_this_period():
            return False  # an untrusted record says nothing (and ``exposure`` already fails closed on it)
        return self._left_behind(here, rel, listing, self._sync_this_period()) is not None  # exposure's reading too

    def delivered(self, path: Path) -> bool | None:
        """Whether the relay holds the file now at ``path`` (one whose name ``watch`` accepts), by the client's record:
        True when it does, or when nothing is there; False while the version on disk has not been uploaded (the
        client offline, the relay down), or while the record cannot be trusted (another local user could have written
        it: it cannot vouch for anything); None when there is no record (the Go client): unknown. The record is read
        afresh, not this period's snapshot: an upload is confirmed as soon as the client records it."""
        if self._distrust_this_period():
            return False
        sync = self._sync_view()
        if sync is None:
            return None
        try:
            local = hashlib.sha256(read_regular(path, MAX_PERM_FILE_BYTES)).hexdigest()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        rel = self._rel(path)
        entry = sync.get(rel[:-1], {}).get(rel[-1])
        return entry is not None and entry.hash == local

    def remember(self, folder: Path) -> None:
        """Read the permission files of ``folder`` before the app overwrites them, so that a version the relay may
        still hold is judged by its content, not counted unknown."""
        here = self._join(self._rel(folder))
        listing = self._list(here)
        if isinstance(listing, dict):
            for name, sig in listing.items():
                self._read(f"{here}/{name}", sig)

    # -- one folder -------------------------------------------------------------------------------------
    def _folder_problem(self, here: str, at: tuple[str, ...], below: tuple[str, ...], allowed: frozenset[str],
                        sync, *, above: bool) -> str | None:
        listing = self._list(here)
        if isinstance(listing, str):
            return f"{here} {listing}"
        if listing is None:
            listing = {}
        for name in sorted(listing):
            path = f"{here}/{name}"
            pf, digest = self._read(path, listing[name])
            if _odd(name):
                self._odd_seen[here] = time.time()
                return (f"{path} is a permission file to the relay (its name ends in {SYFTPERM_FILE}), whose rules "
                        f"replace the first rules of {here}/{SYFTPERM_FILE} there and stay after it is "
                        f"deleted; remove it, then {self._resave(here)}")
            problem = exposure(pf, below, allowed, above=above)
            if problem is not None:
                return f"{path} {problem}"
        if sync is not None:
            problem = self._relay_problem(here, below, allowed, listing, sync.get(at, {}), above)
            if problem is not None:
                return problem
        left = self._left_behind(here, at, listing, sync)
        if left is not None:
            return (f"the relay may still apply the rules of {left}, which it keeps after the file is gone, until you "
                    f"{self._resave(here)}")
        return None

    @staticmethod
    def _resave(here: str) -> str:
        return (f"change and save {here}/{SYFTPERM_FILE} (or create it: [] is enough) so that the relay "
                "replaces that folder's rules (this app does it by itself in its own folders)")

    def _note_uploads(self, here: str, synced: dict[str, Synced]) -> None:
        """Remember when each permission file of ``here`` was last uploaded (a ``syftperm.yaml`` also: deleted), as
        the client records it: its record keeps only each path's last action, and a later failed upload or deletion
        hides when the rules were applied."""
        for name, entry in synced.items():
            if is_permission_name(name) and entry.status == "synced" and entry.at is not None and (
                    entry.action in UPLOADED - {"DELETE_REMOTE"} or (name == SYFTPERM_FILE and
                                                                   entry.action == "DELETE_REMOTE")):
                key = f"{here}/{name}"
                self._uploaded[key] = max(self._uploaded.get(key, entry.at), entry.at, key=_instant)

    def _relay_problem(self, here: str, below, allowed, listing: dict, synced: dict[str, Synced],
                       above: bool) -> str | None:
        """The version of each permission file the relay holds, where it is not the one on disk."""
        for name in sorted(synced):
            entry = synced[name]
            if _odd(name) or entry.hash is None or not is_permission_name(name):
                continue  # odd names: _left_behind; no hash: nothing on the relay; watched files: not permissions
            path = f"{here}/{name}"
            local = self._read(path, listing[name])[1] if name in listing else None
            if entry.hash == local:
                continue
            known = self._known.get(entry.hash)
            if known is not None:
                problem = exposure(known, below, allowed, above=above)
                if problem is None:
                    continue
                return f"the relay still enforces an earlier version of {path}, which {problem}"
            why = ("the SyftBox client has not uploaded its deletion yet" if name not in listing else
                   "the SyftBox client has not uploaded the version on disk yet"
                   + (", and will not while it is invalid" if entry.status == "error" else ""))
            return (f"the relay still holds a version of {path} this app has not seen ({why}), so what it grants "
                    "there is unknown; waiting for the client to upload it")
        return None

    def _left_behind(self, here: str, at: tuple[str, ...], listing: dict, sync) -> str | None:
        """An odd-named permission file of ``here`` whose rules the relay may still apply, else None."""
        if sync is not None:
            synced = sync.get(at, {})
            reset = self._uploaded.get(f"{here}/{SYFTPERM_FILE}")  # the relay replaced (or dropped) its rules
            for name in sorted(synced):
                if not _odd(name):
                    continue
                # its rules were applied when it was last uploaded: then if remembered, else no later than the last
                # action the client recorded on it (any later upload would have replaced that record)
                uploaded = self._uploaded.get(f"{here}/{name}") or synced[name].at
                if uploaded is None or reset is None or _after(uploaded, reset):
                    return f"{here}/{name}"
            return None
        seen = self._odd_seen.get(here)
        if seen is None:
            return None
        sig = listing.get(SYFTPERM_FILE)
        if isinstance(sig, tuple) and sig[2] / 1e9 > seen:
            del self._odd_seen[here]  # its syftperm.yaml was written after: uploaded after, the relay's rules replaced
            return None
        return f"{here} (a file ending in {SYFTPERM_FILE} seen there)"

    # -- file system and caches ---------------------------------------------------------------------------
    def _list(self, folder: str):
        """{name: stat signature} of the permission files in ``folder``; None when it does not exist; a sentence when
        it is not a folder one can trust. Listed again only when the folder changed."""
        if folder in self._memo:
            return self._memo[folder]
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            result = None
        except OSError as e:
            result = f"cannot be checked ({e.strerror or e}), so what its permission files grant is unknown"
        else:
            result = self._scan(folder, st)
            before = self._listed.get(folder)
            if before is not None and before == result:
                result = before  # the same object from period to period while unchanged: kept verdicts compare fast
            else:
                self._listed[folder] = result
        self._memo[folder] = result
        return result

    def _scan(self, folder: str, st: os.stat_result):
        if not stat.S_ISDIR(st.st_mode):
            return (f"is {describe(st.st_mode)}, not a folder, so what the relay makes of it is unknown; "
                    "replace it with a folder")
        trusted = time.time_ns() - RACY_NS  # stamps older than this change with any later write
        sig = _stamp(st)
        cached = self._listing.get(folder)
        if cached is not None and cached[0] == sig:
            names = cached[1]
        else:
            try:
                # a tuple of strings, which the garbage collector stops tracking, unlike a list kept for each folder
                names = tuple(sorted(e.name for e in os.scandir(folder) if is_permission_name(e.name)))
            except OSError as e:
                return f"cannot be listed ({e.strerror or e}), so what its permission files grant is unknown"
            if st.st_ctime_ns < trusted:  # else listed again next period: a name added within the tick is seen then
                self._listing[folder] = (sig, names)
        racy = False  # a file whose content may have changed without its stamp: no verdict kept on it
        out = {}
        for name in names:
            try:
                fst = os.lstat(f"{folder}/{name}")
                out[name] = _stamp(fst)
                racy = racy or fst.st_ctime_ns >= trusted
            except FileNotFoundError:
                continue
            except OSError as e:
                out[name] = str(e.strerror or e)
        if racy:
            self._racy.add(folder)
        return out

    def _read(self, path: str, sig) -> tuple[PermFile, str | None]:
        """The file's reading and the sha256 of its bytes (None when unreadable), again only when it changed."""
        cached = self._files.get(path)
        if cached is not None and cached[0] == sig:
            return cached[1], cached[2]
        digest = None
        if isinstance(sig, str):
            pf = PermFile(unknown=f"cannot be read ({sig})")
        elif not stat.S_ISREG(sig[4]):
            pf = PermFile(unknown=f"is {describe(sig[4])}, not a regular file")
        else:
            try:
                data = read_regular(path, MAX_PERM_FILE_BYTES + 1)  # never blocks on a FIFO swapped in meanwhile
            except OSError as e:
                pf = PermFile(unknown=f"cannot be read ({e.strerror or e})")
            else:
                digest = hashlib.sha256(data).hexdigest()
                pf = self._known.get(digest) or parse_permission_file(os.path.basename(path), data)
                if len(self._known) >= 1 << 16:
                    self._known.pop(next(iter(self._known)))
                    self._evictions += 1
                self._known[digest] = pf
        if isinstance(sig, str) or sig[3] < time.time_ns() - RACY_NS:  # a recent stamp: read again next time
            self._files[path] = (sig, pf, digest)
        return pf, digest

    def _sync_view(self):
        """The client's record, parsed again only when the file changed; the last good one while it is being
        rewritten (the client writes it in place); None when there is none (the Go client): the fallback."""
        path = self.sync_state_file
        if path is None:
            return None
        sig = self._sync.signature(path, path)
        if sig is None:
            return None
        if self._sync.unchanged(path, sig):
            return self._sync.value(path)
        try:
            view = parse_sync_state(read_regular(path, MAX_SYNC_STATE_BYTES + 1, follow=True), self.datasite.name,
                                    self.watch)
        except OSError:
            view = None
        if view is None:
            return self._sync.value(path)
        self._sync.keep(path, sig, view)
        return view


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file or folder from another: inode, size, mtime, ctime, mode (in that order: the
    checks read mtime at [2], ctime at [3], the mode at [4]), device, owner."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_dev, st.st_uid)


def _odd(name: str) -> bool:
    return name.endswith(SYFTPERM_FILE) and name != SYFTPERM_FILE


def _after(a: datetime, b: datetime) -> bool:
    """``a`` at or after ``b``; unknown (one naive, one aware) counts as after: fail closed."""
    try:
        return a >= b
    except TypeError:
        return True


def _instant(t: datetime) -> float:
    return t.timestamp()


def withdraw(files: Iterable[Path | str]) -> tuple[list[str], list[str]]:
    """Remove each of ``files`` (the client then removes the relay's copy). Returns (removed, failed) descriptions."""
    removed, failed = [], []
    for path in files:
        try:
            os.unlink(path)
            removed.append(str(path))
        except FileNotFoundError:
            continue
        except OSError as e:
            failed.append(f"{path} ({e.strerror or e})")
    return removed, failed


def undelivered_causes(sync_state_file: Path | None) -> str:
    """Why ``PermissionGuard.delivered`` can say False, and what to do, for a log line."""
    return (f"the SyftBox client is offline or the relay is down; or {sync_state_file} is an old record left by the "
            "Python client after a switch to the Go client, which never updates it: then remove that file")


@lru_cache(maxsize=64)
def guard_for(datasite: Path, sync_state_file: Path | None = None) -> PermissionGuard:
    """One guard per datasite in this process, shared by the parts of a role (its caches serve them all)."""
    return PermissionGuard(Path(datasite), sync_state_file)


def withhold(guard: PermissionGuard, folder: Path | str, readers: Sequence[str], files: Iterable[Path | str]
             ) -> str | None:
    """Why what the app writes in ``folder`` could be read by anyone but ``readers`` (and the owner), with ``files``
    (what the app published there) then withdrawn; None when the app may write there. The caller says it once
    (``exposure_sentence``)."""
    problem = guard.exposure(folder, readers)
    if problem is None:
        return None
    _, failed = withdraw(files)
    return problem + (f"; cannot remove {', '.join(failed)}: remove them by hand" if failed else "")


def exposure_sentence(problems: Sequence[str], what: str) -> str:
    """One log line for the folders found exposed in one pass (``what`` names them: "inbox folders")."""
    more = f" ({len(problems)} {what}; the first shown)" if len(problems) > 1 else ""
    return (f"{problems[0]}{more}. The app's files there are withdrawn (removed, so that the relay removes them too) "
            "and nothing is written there until that is changed.")
