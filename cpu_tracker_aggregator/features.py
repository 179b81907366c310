"""The aggregator's features beside the local figure, each one small protocol (``Feature``).

At every tick the aggregator, for each feature in the order of ``aggregator.FEATURES``:

1. checks the folders it ``guarded()`` (before anything is written: an exposed one's file is withdrawn);
2. calls ``tick(now)`` (True when what it adds to the figure changed; a failure is logged once and the others and
   the local figure carry on);
3. when the dashboard is built: passes ``inputs()`` to ``build_dashboard`` (what the feature feeds the figure
   itself: the secure figure, which can lead), then ``attach(dashboard)`` (what it adds beside it: the alerts);
4. exposes ``metrics(dashboard)`` of the published dashboard through its own collector (``metrics.py``).

A new capability is a module with a ``Feature`` subclass (plus its settings and its schema) and its line in
``FEATURES``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

from shared.logs import Problems
from shared.paths import Paths, is_datasite_email
from shared.wire.schema import Dashboard
from shared.settings import Settings

from cpu_tracker_aggregator.metrics import secure_metrics


@dataclass(frozen=True)
class Guarded:
    """Folders only some may read, of one kind (``key``, ``what``: how a problem with them is said): each as
    (folder, who may read it, the files withdrawn while it is exposed)."""

    key: str
    what: str
    folders: list[tuple[Path | str, list[str], list[Path | str]]]


class Feature:
    """One capability of the aggregator. ``name`` keys its problems and ``aggregator.features``; ``what`` says it in
    the log. The defaults add nothing."""

    name: str
    what: str

    def __init__(self, paths: Paths, settings: Settings, problems: Problems):
        self.paths, self.settings, self.problems = paths, settings, problems

    def tick(self, now: datetime) -> bool:
        """One tick's upkeep; True when what the feature adds to the figure changed. May raise."""
        return False

    def inputs(self) -> dict[str, object]:
        """Keyword arguments of ``build_dashboard``: what the feature feeds the figure itself."""
        return {}

    def attach(self, dashboard: Dashboard) -> Dashboard:
        """The built dashboard with what the feature adds beside the figure."""
        return dashboard

    def metrics(self, dashboard: Dashboard) -> Iterable:
        """Its Prometheus metric families, from the published dashboard only (so only what is public)."""
        return ()

    def guarded(self) -> list[Guarded]:
        """Its folders that only some may read, checked at every tick before anything is written."""
        return []


def member_folders(key: str, what: str, folder_of: Callable[[str], Path], file_of: Callable[[str], Path]) -> Guarded:
    """The per-member folders of one kind that exist now, each readable by its member only (as text: a ``Path`` per
    member per tick was most of the cost of this check at 10,000 members)."""
    root = str(folder_of("x").parent)
    inside = str(file_of("x").relative_to(folder_of("x")))
    try:
        names = sorted(os.listdir(root))
    except OSError:
        names = []
    known = _MEMBER_FOLDERS.setdefault((root, inside), {})
    if len(known) > 2 * len(names) + 1024:  # folders gone since: forget them
        known.clear()
    out = []
    for m in names:
        entry = known.get(m)
        if entry is None:
            if not is_datasite_email(m):
                continue
            entry = known[m] = (f"{root}/{m}", [m], [f"{root}/{m}/{inside}"])
        out.append(entry)
    return Guarded(key, what, out)


_MEMBER_FOLDERS: dict[tuple[str, str], dict[str, tuple]] = {}  # (root, file inside) -> name -> its entry, built once:
#                                                                 10,000 new ones a tick were kept long enough to make
#                                                                 work for the garbage collector


class SecureRounds(Feature):
    """Secure mode's rounds (``secure.SecureAggregator``, run only in secure mode): their figure is an input of the
    dashboard, where it leads while recent (``build_dashboard``; the aggregator redraws it when it lapses). The
    epoch and inbox folders are guarded in every mode (a local-mode aggregator may hold files from a secure-mode
    past)."""

    name = "secure"
    what = "secure rounds"

    def __init__(self, paths: Paths, settings: Settings, problems: Problems):
        super().__init__(paths, settings, problems)
        self.rounds = None  # tick(now) -> bool, .figure and .epoch: what the aggregator needs of the rounds
        if settings.mode == "secure":  # imported only here: local mode never loads the cryptography
            from cpu_tracker_aggregator.secure import SecureAggregator

            self.rounds = SecureAggregator(paths, settings, problems)

    def tick(self, now: datetime) -> bool:
        return self.rounds is not None and self.rounds.tick(now)

    def inputs(self) -> dict[str, object]:
        return {"secure": self.rounds.figure if self.rounds is not None else None}

    def metrics(self, dashboard: Dashboard) -> Iterable:
        return secure_metrics(dashboard.secure) if dashboard.secure is not None else ()

    def guarded(self) -> list[Guarded]:
        p = self.paths
        epoch = self.rounds.epoch if self.rounds is not None else None
        cohort = epoch.emails() if epoch else []
        return [Guarded("epoch-exposed", "epoch folders", [(p.epoch_dir(), cohort, [p.epoch_file(), p.rounds_file()])]),
                member_folders("inbox-exposed", "inbox folders", p.inbox_dir, p.inbox_file)]
