"""The member: sample CPU over the whole window, record the spend, publish a DP mean for the aggregator only.

Nothing below ``run_member`` reads the clock or psutil by itself: callers pass ``read``, ``clock``,
``sleep`` and ``wall``, so tests drive it with fixed values.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from threading import Event
from typing import Callable

from cpu_tracker_member.monitor import composed_words
from cpu_tracker_member.release import observers_for, release_for
from shared import __version__
from shared.atomic import PRIVATE, atomic_write_json, atomic_write_text, remove_stale_temps, secure_private_tree
from shared.privacy.ledger import Charge, Ledger, LedgerKeeper, Spend, spent_per_budget
from shared.logs import Hourly, Problems
from shared.paths import Paths
from shared.permissions import PermissionGuard, ensure_permissions, undelivered_causes, withdraw
from shared.privacy import CPU_BOUNDS, SECOND_UNIT, UNIT_S, clip_cpu, laplace_release, window_sensitivity
from shared.host.runner import Role
from shared.wire.schema import MemberReport, PrivacyUnit, Window, utc_now
from shared.settings import Settings, settings_warnings

RAW_KEEP = 2000  # raw window means kept for the owner's `status`
HOUR = timedelta(hours=1)

log = logging.getLogger("cpu_tracker.member")


def measure_window(
    interval_s: float,
    *,
    read: Callable[[], float],
    clock: Callable[[], float] = time.monotonic,
    stop: Event | None = None,
) -> float | None:
    """Wait ``interval_s`` seconds, then return the CPU utilisation (percent) over them, or None if ``stop``
    was set first. ``read`` is ``psutil.cpu_percent``, which measures since its previous call: one reading at
    each window's end covers the window exactly, provided ``read`` was primed once before the first window.

    That reading is the time average of the busy fraction (in [0, 100]) over the window: changing any one
    second of activity moves it by at most 100 / n for n = floor(interval) whole seconds, the sensitivity the
    privacy analysis uses, computed from the kernel's busy-time counters (exact, no missed samples, and no
    wake-ups within the window)."""
    deadline = clock() + interval_s
    while (left := deadline - clock()) > 0:
        if stop is not None and stop.wait(left):
            return None
        if stop is None:
            time.sleep(left)
    return float(read())


def build_report(
    raw_mean: float, n_samples: int, start: datetime, end: datetime, settings: Settings, *, random_state=None
) -> tuple[float, MemberReport]:
    """The raw (private, clipped) mean of a window of ``n_samples`` whole seconds and the report carrying its
    Laplace release, accounted in the fixed unit (one second of activity). Pure but for the noise."""
    raw = clip_cpu(raw_mean)
    release = laplace_release(
        raw, epsilon=settings.epsilon, sensitivity=window_sensitivity(n_samples), random_state=random_state
    )
    report = MemberReport(
        app_version=__version__,
        created_at=end,
        bounds=CPU_BOUNDS,
        window=Window(start=start, end=end, n_samples=n_samples, sample_period_s=UNIT_S),
        release=release,
        privacy_unit=PrivacyUnit(name=SECOND_UNIT, seconds=UNIT_S),
        cpu=release.value,
        timestamp=end.strftime("%Y-%m-%d %H:%M:%S"),
    )
    return raw, report


@dataclass
class Member:
    """Publishes one window at a time. All file I/O of the member role lives here."""

    paths: Paths
    settings: Settings
    problems: Problems
    _guard: PermissionGuard | None = None
    exposed: str | None = None  # why the app's files would be exposed, at the last check (None: they are not)
    keeper: LedgerKeeper = field(init=False)  # the ledger, and every spender's charge to it

    def __post_init__(self) -> None:
        self.keeper = LedgerKeeper(self._open_ledger, self.problems)

    def _open_ledger(self) -> Ledger:
        # first: another local user who can rename the ledger's folder can make it forget a spend
        secure_private_tree(self.paths.private.parent, self.paths.private)
        return Ledger(self.paths.ledger_file, self.settings.budgets,
                      keep_s=max(b.horizon_s for b in self.settings.monitor_budgets))

    def ledger(self) -> Ledger | None:
        """The ledger, loaded once; None (and releases paused) while it is unreadable."""
        return self.keeper.ledger()

    def guard(self) -> PermissionGuard:
        """The check of every permission file that could expose the app's files (made once: it keeps caches)."""
        if self._guard is None:
            report = self.paths.report_file().name
            self._guard = PermissionGuard(self.paths.my_datasite, self.paths.sync_state_file,
                                          lambda name: name == report or self.paths.upload_round(name) is not None)
        return self._guard

    def own_folders(self) -> list[Path]:
        """The folders the member writes into: the report folder, and its secure-mode uploads once they exist."""
        uploads = self.paths.upload_dir()
        return [self.paths.report_dir(), *([uploads] if self.settings.mode == "secure" or uploads.is_dir() else [])]

    def ensure_folder(self) -> bool:
        """(Re)create the report folder and its permission files; say so if something had to be repaired.
        False (logged once) when they cannot be put in order: then nothing may be published there, since a
        report without its permission files would fall under whatever a parent folder grants. Where the relay may
        still apply rules a removed ``*syftperm.yaml`` left, its ``syftperm.yaml`` is written again so that they go."""
        folder = self.paths.report_dir()
        guard = self.guard()
        try:
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(f"{folder} is a file; remove it so the report folder can be created")
            guard.refresh()
            guard.remember(folder)  # what the relay may still hold is judged by its content, not counted unknown
            fixed = ensure_permissions(folder, self.paths.email, [self.settings.aggregator],
                                       reset=guard.needs_reset(folder))
            for extra in self.own_folders()[1:]:
                if extra.is_dir() and guard.needs_reset(extra):
                    ensure_permissions(extra, self.paths.email, [self.settings.aggregator], reset=True)
            if not os.access(folder, os.W_OK):  # found before spending budget on a report that cannot be written
                read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
                raise OSError(errno.EROFS if read_only else errno.EACCES,
                              "Read-only file system" if read_only else "Permission denied", str(folder))
        except OSError as e:
            self.problems.report(
                "perms", f"cannot set up {folder}: {e}. Check disk space and permissions; not publishing until then."
            )
            return False
        self.problems.clear("perms", "report folder permissions in order again")
        if fixed and self.keeper.current is not None:  # first start writes them silently
            log.warning("repaired %s in %s (missing or changed)", ", ".join(fixed), folder)
        return True

    def parents_safe(self) -> bool:
        """False (the app's files withdrawn, logged once) while a permission file could let anyone but the owner and
        the aggregator read what the member writes: any file the relay honours from the datasite root down to and
        inside the report folder (and its ``secure/`` uploads), on disk or as the relay still holds it
        (``PermissionGuard``). True again (logged once) when that is fixed."""
        guard = self.guard()
        guard.refresh()
        top = self.paths.report_dir()
        found = [guard.exposure(f, [self.settings.aggregator], top=top) for f in self.own_folders()]  # each: it learns
        problem = next((p for p in found if p), None)
        self.exposed = problem
        if problem is None:
            self.problems.clear("parents", "the permission files over the app's files are safe again: releases resume")
            return True
        removed, failed = withdraw(self.published_files())
        if failed:
            self.problems.report("withdraw", f"cannot withdraw {', '.join(failed)}; remove them by hand")
        else:
            self.problems.clear("withdraw")
        for path in removed:
            log.info("withdrew %s", path)
        self.problems.report(
            "parents", f"{problem}. The app's files in {self.paths.report_dir()} (the report, monitor.json, the secure "
            "key and round files) are withdrawn (removed, so that the relay removes them too) and nothing is published "
            "or spent until that is changed; releases then resume by themselves.", logging.ERROR)
        return False

    def upload_delivered(self, path: Path) -> bool | None:
        """Whether the relay holds the secure upload at ``path`` (``PermissionGuard.delivered``)."""
        return self.guard().delivered(path)

    def delivered(self) -> bool:
        """False (said once) while the last report written has not reached the relay, by the SyftBox client's own
        record: the client is offline or the relay down, and a new release would replace it unseen (the client
        uploads only the newest), so none is spent until it has. A relay outage of any length thus costs at most
        that one release. True again (said once) once it is there; always True without a record (the Go client)."""
        if self.guard().delivered(self.paths.report_file()) is False:
            self.problems.report("undelivered", f"the last report ({self.paths.report_file()}) has not reached the "
                                 f"relay yet ({undelivered_causes(self.paths.sync_state_file)}): no release is spent "
                                 "until it has, since a new one would replace it unseen")
            return False
        self.problems.clear("undelivered", "the relay has the last report: releases resume")
        return True

    def published_files(self) -> list[Path]:
        """Every file the member publishes (shared/paths.py): withdrawn together when their folder is exposed."""
        p = self.paths
        files = [p.report_file(), p.monitor_signals_file(), p.secure_join_file(), p.answers_file()]
        try:
            names = os.listdir(p.upload_dir())
        except OSError:
            names = []
        rounds = (r for n in names if (r := p.upload_round(n)) is not None)
        return files + [f for r in rounds if (f := p.upload_file(r)).name in names]

    def publish(self, raw_mean: float, start: datetime, end: datetime) -> MemberReport | None:
        """Spend budget for the window, then write the report. Returns the report, or None if nothing was
        published (parent permission unsafe, budget exhausted, ledger unusable, disk trouble: each logged
        once)."""
        if not self.ensure_folder() or not self.parents_safe():
            return None
        if self.ledger() is None or not self.delivered():
            return None
        raw, report = build_report(raw_mean, self.settings.samples_per_window, start, end, self.settings)
        spend = Spend(
            released_at=report.created_at,
            window_start=start,
            window_end=end,
            epsilon=report.release.epsilon,
            delta=report.release.delta,
            mechanism=report.release.mechanism,
            unit=report.privacy_unit.name,
            n_samples=report.window.n_samples,
        )
        if self.keeper.charge(spend) is not Charge.CHARGED:
            return None
        try:
            atomic_write_json(self.paths.report_file(), report.model_dump(mode="json"))
            self.problems.clear("report-write", "report written again")
        except OSError as e:
            self.problems.report("report-write", f"cannot write {self.paths.report_file()}: {e}. Free disk space.")
            return None
        self._keep_raw(raw, report)
        return report

    def _keep_raw(self, raw: float, report: MemberReport) -> None:
        line = json.dumps(
            {"window_start": report.window.start.isoformat(), "window_end": report.window.end.isoformat(),
             "raw_mean": raw, "released": report.release.value,
             "epsilon": report.release.epsilon, "n_samples": report.window.n_samples}
        )
        path = self.paths.raw_file
        try:
            lines = path.read_text().splitlines()[-(RAW_KEEP - 1):] if path.exists() else []
            atomic_write_text(path, "\n".join([*lines, line]) + "\n", durable=False, mode=PRIVATE)
        except (OSError, ValueError) as e:  # ValueError: the file was edited into something not UTF-8
            self.problems.report("raw-write", f"cannot keep the raw mean in {path}: {e}")


def run_member(
    member: Member,
    stop: Event,
    *,
    read: Callable[[], float],
    wall: Callable[[], datetime] = utc_now,
    clock: Callable[[], float] = time.monotonic,
    once: bool = False,
) -> None:
    """Prime ``read``, then measure and publish window after window until ``stop`` is set. Windows are
    back to back: each starts where the previous one ended, so no activity is missed or counted twice."""
    s = member.settings
    for folder in (member.paths.report_dir(), member.paths.ledger_file.parent):
        remove_stale_temps(folder)  # left by a kill mid-write; this process holds the instance lock
    if member.ensure_folder():
        member.parents_safe()  # an exposed folder withdraws what was left from before at once, not a window later
    for warning in settings_warnings(s):
        log.warning("%s", warning)
    release = release_for(member)  # local or secure, by the settings
    release.start(stop)
    observers = observers_for(member)  # the private alerts (safe zones): one check per window
    read()  # psutil's first reading is meaningless: discard it
    start = wall()
    summary = Hourly(log, lambda totals, now: hourly_line(s, member.keeper.spends, totals, now))
    while not stop.is_set():
        raw = measure_window(release.span(wall), read=read, clock=clock, stop=stop)
        if raw is None:
            return
        end, published = wall(), False
        if end <= start:  # the wall clock was stepped back: this window cannot be dated, so it is not released
            member.problems.report(
                "clock", f"the clock went back from {start.isoformat()} to {end.isoformat()}: window skipped; "
                "windows that re-use time already spent are charged again by the ledger")
        elif published := release.release(raw, start, end):
            member.problems.clear("clock")
            log.log(logging.INFO if once else logging.DEBUG, "%s", release.said(end))
        summary.add(end.timestamp(), windows=1, published=published, epsilon=release.epsilon * published)
        if end > start:
            for observer in observers:
                observer.step(raw, start, end)
        start = end
        if once:
            return


def hourly_line(settings: Settings, spends: list[Spend] | None, totals: dict[str, float], now: float) -> str:
    """The member's hourly log line: what it published and, from the ledger's ``spends`` (None: the ledger is not
    open), the budget left in each rolling span ending now."""
    line = (f"last hour: {totals.get('published', 0):.0f} of {totals.get('windows', 0):.0f} windows published, "
            f"epsilon {totals.get('epsilon', 0):.4g} spent")
    end = datetime.fromtimestamp(now, timezone.utc)
    spans = [b for b in settings.budgets if b.horizon_s > 0]
    if spends is not None and spans:
        left = [f"{b.epsilon - spent:.4g} of {b.epsilon:g} per {b.horizon_s:g} s"
                for b, spent in spent_per_budget(spends, spans, end)]
        line += "; budget left " + ", ".join(left)
    if spends is not None and (composed := composed_words(settings, spends, end - HOUR, end)):
        line += "; " + composed
    return line


def run(paths: Paths, settings: Settings, stop: Event, *, once: bool = False) -> None:
    """The member role as the runner starts it: psutil's counters, the real clocks."""
    import psutil

    run_member(Member(paths, settings, Problems(log)), stop, read=psutil.cpu_percent, once=once)


ROLE = Role("member", run)
