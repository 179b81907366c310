"""Permission files for the folders the app publishes, for both SyftBox clients, and the check of the
permission files above a private folder.

- ``syftperm.yaml`` (the PyPI client 0.4.x and its server): an ordered list of rules, later rules win.
  We start with a rule that *disallows* everything to everyone, then grant the owner everything and the
  readers read. That protects the report against a broader parent grant only when our file is applied
  last, and the 0.4.0 server does not apply files by depth: it applies every file on the path in database
  row order, so the most recently *written* file wins (FACTS.md). A parent grant written or edited after
  our file makes the report downloadable by anyone, and re-writing our unchanged file uploads nothing.
- ``syft.pub.yaml`` (the newer Go client): ``terminal: true`` and one rule naming the readers. A parent
  file with ``terminal: true`` overrides ours.

So our own files cannot protect the report alone: ``parent_grant_problem`` reads every permission file on
the path from the datasite root down to the report folder, and the member withdraws its report while any
of them could let someone other than the owner and the aggregator read it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import yaml
from wcmatch import glob as wcglob

from shared.atomic import read_regular, write_if_changed
from shared.paths import SYFT_PUB_FILE, SYFTPERM_FILE

ALL = ["admin", "create", "write", "read"]


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


def ensure_permissions(folder: Path, owner: str, readers: Sequence[str]) -> list[str]:
    """Create ``folder`` and (re)write its permission files where they differ from what they must be.
    Returns the names of the files that were missing or changed (empty when all was in order)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [name for name, data in permission_files(owner, readers).items() if write_if_changed(folder / name, data)]


# ---------------------------------------------------------------------------------------------------
# Parent permission files
# ---------------------------------------------------------------------------------------------------
_GRANTS_READ = {"read", "admin"}  # syftbox 0.4.0: write and create need read; admin is everything
_GLOB = set("*?[]{}")  # the Go server reads a user entry with any of these as a pattern
MAX_PERM_FILE_BYTES = 1 << 20


def parent_grant_problem(datasite: Path, report_file: Path, allowed: Sequence[str]) -> str | None:
    """Why a permission file above ``report_file``'s folder (inside ``datasite``, the owner's datasite root)
    could let someone other than ``allowed`` (the owner and the aggregator) read the report, naming the file
    and the rule to change; None when every such file is safe.

    Checked at the datasite root and every folder down to the report folder's parent, in both formats: a
    ``syftperm.yaml`` rule that allows read or admin to ``*``, to a pattern or to any other email, on a path
    pattern that matches the report; a ``syft.pub.yaml`` that is terminal, or whose rule grants admin, write
    or read to anyone else on such a pattern. A file that cannot be read or parsed counts as unsafe: what the
    relay makes of it cannot be known."""
    datasite, report_file = Path(datasite), Path(report_file)
    parts = report_file.relative_to(datasite).parts
    allowed_set = set(allowed)
    here = datasite
    for depth in range(len(parts) - 1):  # the root, then each folder above the report folder
        target = "/".join(parts[depth:])  # the report's path relative to the permission file's folder
        for name, check in ((SYFTPERM_FILE, _syftperm_problem), (SYFT_PUB_FILE, _syft_pub_problem)):
            path = here / name
            problem = _read_and_check(path, check, target, allowed_set)
            if problem:
                return f"{path} {problem}"
        here = here / parts[depth]
    return None


def _read_and_check(path: Path, check, target: str, allowed: set[str]) -> str | None:
    try:
        data = read_regular(path, MAX_PERM_FILE_BYTES + 1)  # never blocks on a FIFO, never follows a symlink
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be read ({e.strerror or e}), so what it grants is unknown; fix its permissions or remove it"
    if len(data) > MAX_PERM_FILE_BYTES:
        return "is larger than 1 MiB, so what it grants is unknown; shorten it or remove it"
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        return f"is not valid YAML ({e.__class__.__name__}), so what it grants is unknown; fix it or remove it"
    try:
        return check(doc, target, allowed)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        return f"cannot be understood ({e}), so what it grants is unknown; fix it or remove it"


def _applies(pattern, target: str) -> bool:
    """Whether a rule's path ``pattern`` (relative to its file's folder) can match ``target``. ``{useremail}``
    stands for the reader's email: taken as any one name. Not a string: treated as matching everything."""
    if not isinstance(pattern, str):
        raise ValueError(f"path pattern {pattern!r} is not text")
    pattern = pattern.replace("{useremail}", "*").lstrip("/") or "**"
    return wcglob.globmatch(target, pattern, flags=wcglob.GLOBSTAR | wcglob.DOTGLOB)


def _outsider(user, allowed: set[str]) -> bool:
    if not isinstance(user, str):
        raise ValueError(f"user {user!r} is not text")
    return user not in allowed or bool(_GLOB & set(user))


def _syftperm_problem(doc, target: str, allowed: set[str]) -> str | None:
    if doc is None:
        return None
    if not isinstance(doc, list):
        raise ValueError("it is not a list of rules")
    for number, rule in enumerate(doc, start=1):
        if not isinstance(rule, dict):
            raise ValueError(f"rule {number} is not a mapping")
        if rule.get("type", "allow") == "disallow":
            continue
        perms = rule.get("permissions", [])
        perms = [perms] if isinstance(perms, str) else perms
        if not isinstance(perms, list):
            raise ValueError(f"rule {number} has permissions {perms!r}")
        grants = sorted(_GRANTS_READ & {str(p).lower() for p in perms})
        if grants and _outsider(rule.get("user"), allowed) and _applies(rule.get("path", "**"), target):
            return (f"has rule {number} (path {rule.get('path')!r}, user {rule.get('user')!r}, "
                    f"permissions {perms!r}) lets others read the report; remove that rule or narrow its path "
                    "so it does not cover app_data/")
    return None


def _syft_pub_problem(doc, target: str, allowed: set[str]) -> str | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ValueError("it is not a mapping")
    if doc.get("terminal"):
        return ("has terminal: true, which overrides the report folder's own syft.pub.yaml; set terminal: false "
                "(or remove the file)")
    rules = doc.get("rules") or []
    if not isinstance(rules, list):
        raise ValueError("rules is not a list")
    for number, rule in enumerate(rules, start=1):
        if not isinstance(rule, dict):
            raise ValueError(f"rule {number} is not a mapping")
        access = rule.get("access") or {}
        if not isinstance(access, dict):
            raise ValueError(f"rule {number} access is not a mapping")
        for kind in ("admin", "write", "read"):
            users = access.get(kind) or []
            users = [users] if isinstance(users, str) else users
            if not isinstance(users, list):
                raise ValueError(f"rule {number} access.{kind} is not a list")
            others = [u for u in users if _outsider(u, allowed)]
            if others and _applies(rule.get("pattern", "**"), target):
                return (f"has rule {number} (pattern {rule.get('pattern')!r}) grants {kind} to {others!r}, which lets "
                        "others read the report; remove them or narrow the pattern so it does not cover app_data/")
    return None
