"""Permission files for the folders the app publishes, for both SyftBox clients.

- ``syftperm.yaml`` (the PyPI client 0.4.x and its server): an ordered list of rules, later rules win.
  We start with a rule that *disallows* everything to everyone, so a broader grant inherited from a
  parent folder can never leak a report, then grant the owner everything and the readers read.
- ``syft.pub.yaml`` (the newer Go client): ``terminal: true`` and one rule naming the readers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import yaml

from shared.atomic import write_if_changed
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
