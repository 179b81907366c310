"""The member: sample CPU over the whole window, record the spend, publish a DP mean for the aggregator only.

Nothing below ``run_member`` reads the clock or psutil by itself: callers pass ``read``, ``clock``,
``sleep`` and ``wall``, so tests drive it with fixed values.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from threading import Event
from typing import Callable

from cpu_tracker_member.monitor import MemberMonitors, composed_words
from shared import __version__
from shared.atomic import PRIVATE, atomic_write_json, atomic_write_text, remove_stale_temps
from shared.ledger import BudgetExceeded, Ledger, LedgerCorrupt, Spend, spent_per_budget
from shared.logs import Hourly, Problems
from shared.paths import Paths
from shared.permissions import ensure_permissions, parent_grant_problem
from shared.privacy import UNIT_NAME, UNIT_S, laplace_release, mean_sensitivity
from shared.runner import Role
from shared.schema import CPU_BOUNDS, MemberReport, PrivacyUnit, Window, utc_now
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
    raw = min(max(float(raw_mean), CPU_BOUNDS[0]), CPU_BOUNDS[1])
    release = laplace_release(
        raw, epsilon=settings.epsilon, sensitivity=mean_sensitivity(*CPU_BOUNDS, n_samples), random_state=random_state
    )
    report = MemberReport(
        app_version=__version__,
        created_at=end,
        bounds=CPU_BOUNDS,
        window=Window(start=start, end=end, n_samples=n_samples, sample_period_s=UNIT_S),
        release=release,
        privacy_unit=PrivacyUnit(name=UNIT_NAME, seconds=UNIT_S),
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
    _ledger: Ledger | None = None

    def ledger(self) -> Ledger | None:
        """The ledger, loaded once; None (and releases paused) while it is unreadable."""
        if self._ledger is None:
            try:
                self._ledger = Ledger(self.paths.ledger_file, self.settings.budgets,
                                      keep_s=max(b.horizon_s for b in self.settings.monitor_budgets))
                self.problems.clear("ledger", "privacy ledger readable again: releases resume")
            except (LedgerCorrupt, OSError) as e:
                self.problems.report("ledger", f"privacy ledger unusable, releases paused: {e}", logging.ERROR)
        return self._ledger

    def ensure_folder(self) -> bool:
        """(Re)create the report folder and its permission files; say so if something had to be repaired.
        False (logged once) when they cannot be put in order: then nothing may be published there, since a
        report without its permission files would fall under whatever a parent folder grants."""
        folder = self.paths.report_dir()
        try:
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(f"{folder} is a file; remove it so the report folder can be created")
            fixed = ensure_permissions(folder, self.paths.email, [self.settings.aggregator])
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
        if fixed and self._ledger is not None:  # first start writes them silently
            log.warning("repaired %s in %s (missing or changed)", ", ".join(fixed), folder)
        return True

    def parents_safe(self) -> bool:
        """False (the report withdrawn, logged once) while a permission file above the report folder could let
        anyone but the owner and the aggregator read it: the 0.4.0 relay applies the most recently written
        permission file on a path, whatever its depth, and a terminal parent syft.pub.yaml overrides ours, so
        our own files cannot protect the report alone. True again (logged once) when that is fixed."""
        problem = parent_grant_problem(
            self.paths.my_datasite, self.paths.report_file(), [self.paths.email, self.settings.aggregator]
        )
        if problem is None:
            self.problems.clear("parents", "the permission files above the report folder are safe again: "
                                "releases resume")
            return True
        try:
            self.paths.report_file().unlink(missing_ok=True)  # the relay then deletes its copy too
            self.problems.clear("withdraw")
        except OSError as e:
            self.problems.report("withdraw", f"cannot withdraw {self.paths.report_file()}: {e}; remove it by hand")
        self.problems.report(
            "parents", f"{problem}. The report is withdrawn (its file removed, so the relay removes it too) and "
            "nothing is published or spent until that is changed; releases then resume by themselves.",
            logging.ERROR)
        return False

    def publish(self, raw_mean: float, start: datetime, end: datetime) -> MemberReport | None:
        """Spend budget for the window, then write the report. Returns the report, or None if nothing was
        published (parent permission unsafe, budget exhausted, ledger unusable, disk trouble: each logged
        once)."""
        if not self.parents_safe() or not self.ensure_folder():
            return None
        ledger = self.ledger()
        if ledger is None:
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
        try:
            ledger.admit(spend)
            self.problems.clear("budget", "privacy budget available again: releases resume")
        except BudgetExceeded as e:
            if "budget" not in self.problems.active:  # once per pause, whichever budget binds at each window
                self.problems.report("budget", f"{e}; releases resume by themselves once the span rolls past")
            return None
        except LedgerCorrupt as e:  # edited into garbage while running: pause, as at start
            self._ledger = None
            self.problems.report("ledger", f"privacy ledger unusable, releases paused: {e}", logging.ERROR)
            return None
        except OSError as e:
            self.problems.report("ledger-write", f"cannot record the release in the ledger, not publishing: {e}")
            return None
        self.problems.clear("ledger-write")
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
    member.parents_safe()  # an unsafe parent withdraws a report left from before at once, not a window later
    member.ensure_folder()
    for warning in settings_warnings(s):
        log.warning("%s", warning)
    secure = None
    if s.mode == "secure":  # imported only here: local mode never loads the cryptography and accounting
        from cpu_tracker_member.secure import SecureMember

        secure = SecureMember(member.paths, s, member.problems, member.ledger)
        threading.Thread(target=secure.answer_loop, args=(stop,), name="secure-answers", daemon=True).start()
    read()  # psutil's first reading is meaningless: discard it
    start = wall()
    summary = Hourly(log, lambda totals, now: hourly_line(member, totals, now))
    monitors = MemberMonitors(member)  # private alerts (safe zones): one check per window
    while not stop.is_set():
        # secure rounds are UTC windows (round r = [r * interval, (r + 1) * interval)): end each window on one
        span = s.interval_s if secure is None else _to_boundary(wall().timestamp(), s.interval_s)
        raw = measure_window(span, read=read, clock=clock, stop=stop)
        if raw is None:
            return
        end, published = wall(), False
        if end <= start:  # the wall clock was stepped back: this window cannot be dated, so it is not released
            member.problems.report(
                "clock", f"the clock went back from {start.isoformat()} to {end.isoformat()}: window skipped; "
                "windows that re-use time already spent are charged again by the ledger")
        elif secure is not None:
            published = member.parents_safe() and member.ensure_folder() and secure.publish(raw, start, end)
            if published:
                member.problems.clear("clock")
                log.log(logging.INFO if once else logging.DEBUG, "secure round ending %s uploaded",
                        end.isoformat(timespec="seconds"))
        elif published := (member.publish(raw, start, end) is not None):
            member.problems.clear("clock")
            log.log(logging.INFO if once else logging.DEBUG, "published window ending %s (epsilon %g)",
                    end.isoformat(timespec="seconds"), s.epsilon)
        per_release = s.epsilon if secure is None else s.secure_target  # secure: at most; the epoch's noise decides
        summary.add(end.timestamp(), windows=1, published=published, epsilon=per_release * published)
        if end > start:
            monitors.step(raw, start, end)
        start = end
        if once:
            return


def _to_boundary(now: float, interval_s: float) -> float:
    """Seconds from ``now`` to the next UTC multiple of ``interval_s`` (the end of the current secure round)."""
    return (math.floor(now / interval_s) + 1) * interval_s - now


def hourly_line(member: Member, totals: dict[str, float], now: float) -> str:
    """The member's hourly log line: what it published and the budget left in each rolling span ending now."""
    line = (f"last hour: {totals.get('published', 0):.0f} of {totals.get('windows', 0):.0f} windows published, "
            f"epsilon {totals.get('epsilon', 0):.4g} spent")
    ledger, end = member._ledger, datetime.fromtimestamp(now, timezone.utc)
    spans = [b for b in member.settings.budgets if b.horizon_s > 0]
    if ledger is not None and spans:
        left = [f"{b.epsilon - spent:.4g} of {b.epsilon:g} per {b.horizon_s:g} s"
                for b, spent in spent_per_budget(ledger.spends, spans, end)]
        line += "; budget left " + ", ".join(left)
    if ledger is not None and (composed := composed_words(member.settings, ledger.spends, end - HOUR, end)):
        line += "; " + composed
    return line


def run(paths: Paths, settings: Settings, stop: Event, *, once: bool = False) -> None:
    """The member role as the runner starts it: psutil's counters, the real clocks."""
    import psutil

    run_member(Member(paths, settings, Problems(log)), stop, read=psutil.cpu_percent, once=once)


ROLE = Role("member", run)
