"""The privacy ledger: every release, recorded before it is published, in a file that survives crashes.

Time blocks play the part of the data blocks of privacy budget scheduling (Luo et al., OSDI 2021): a
release spends its epsilon on the span of time its window covers. A rolling budget (horizon H, cap C)
says that the releases whose windows touch any span of H seconds spend at most C in total. A release is
admitted only if, with it, every budget still holds for every span; otherwise it is never published.
This holds across restarts because the record is appended and fsynced *before* the report is written:
a crash between the two wastes budget, never overspends it.

File format: JSON Lines, one ``Spend`` per line, plus meta lines ``{"ledger_meta": {"max_horizon_s": H}}``
that record the longest budget horizon the ledger has ever enforced. Retention (what compaction keeps) is
that horizon + 1 h, never the current settings' alone: shortening the budgets for a while and restoring them
cannot make the ledger forget a spend the restored budget needs. Compaction writes the meta line first; a
ledger without one (older versions) is credited with the whole span it holds. A torn last line (crash
mid-append) is cut off on open; any other unreadable line stops releases (the budget can no longer be proven)
until the owner acts.

Units: every line says its privacy unit. Budgets are checked in the fixed unit, one second of CPU activity
(``shared.privacy.SECOND_UNIT``); older lines in ``cpu_sample`` are converted conservatively
(``shared.privacy.epsilon_per_unit``).

The file is the owner's alone: mode 0600 in a 0700 folder, whatever the umask, also after compaction.

Every read and append happens under an exclusive ``flock`` of the file, so a second process (a second
instance, ``status``) never cuts a line that is being written and never admits a release without seeing
the others. A failed append is rolled back (a disk-full short write leaves no partial line behind), and a
file deleted, truncated or replaced behind the process's back gets the releases it lost appended again
from memory: the budget already spent is never forgotten while the process runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from collections import Counter
from contextlib import contextmanager
from enum import Enum
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.atomic import PRIVATE, atomic_write_text, ensure_private_dir
from shared.logs import Problems
from shared.privacy import (DAY_UNIT, LEGACY_UNIT, MAX_HORIZON_S, SECOND_UNIT, WINDOW_UNIT, Budget, budget_words,
                            epsilon_per_unit)

log = logging.getLogger("cpu_tracker.ledger")


class Spend(BaseModel):
    """One release, as the ledger records it. Mechanism-agnostic: any release spends (epsilon, delta)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    released_at: AwareDatetime
    window_start: AwareDatetime
    window_end: AwareDatetime
    epsilon: float = Field(gt=0)
    delta: float = Field(default=0.0, ge=0)
    mechanism: str
    unit: Literal[SECOND_UNIT, LEGACY_UNIT, WINDOW_UNIT, DAY_UNIT] = LEGACY_UNIT  # type: ignore[valid-type]  # none: before the fixed unit
    n_samples: int = Field(ge=1)
    noise: str | None = Field(default=None, description="Secure releases: the epoch's NoiseSpec (JSON), from which "
                              "the day's releases are composed with dp-accounting.")
    survivors: int | None = Field(default=None, ge=1, description="Secure releases: the shares the noise is "
                                  "accounted with (the epoch's fewest survivors: the worst case).")

    @model_validator(mode="after")
    def _ordered(self) -> "Spend":
        if self.window_end <= self.window_start:  # a report's Window refuses the same; the arithmetic relies on it
            raise ValueError(f"window_end must be after window_start, got {self.window_start} .. {self.window_end}")
        return self


class LedgerCorrupt(RuntimeError):
    """The ledger has an unreadable line other than a torn last one."""


class BudgetExceeded(RuntimeError):
    def __init__(self, budget: Budget, spent: float):
        super().__init__(
            f"release skipped: with it, {spent:.4g} epsilon (per second of activity) would be spent on one span, "
            f"over the budget of {budget_words(budget)}"
        )
        self.budget, self.spent = budget, spent


# ---------------------------------------------------------------------------------------------------
# Pure budget arithmetic
# ---------------------------------------------------------------------------------------------------
def _arrays(spends: Iterable[Spend]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = np.array([_row(s) for s in spends], dtype=float).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def _row(s: Spend) -> tuple[float, float, float]:
    """(start, end, epsilon in the fixed unit): the only view of a spend the budget arithmetic sees."""
    start, end = s.window_start.timestamp(), s.window_end.timestamp()
    return (start, end, epsilon_per_unit(s.unit, s.epsilon, n_samples=s.n_samples, window_s=end - start))


def _sum_at_or_above(keys: np.ndarray, eps: np.ndarray, at: np.ndarray) -> np.ndarray:
    """For each x in ``at``: the sum of ``eps`` over the entries whose key is >= x."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    suffix = np.concatenate([np.cumsum(eps[order][::-1])[::-1], [0.0]])
    return suffix[np.searchsorted(sorted_keys, at, side="left")]


def worst_span(starts: np.ndarray, ends: np.ndarray, eps: np.ndarray, horizon_s: float) -> float:
    """Largest epsilon spent, by the releases (windows [start, end), half-open) whose last entry is the new one,
    on any closed span [t, t + H] that touches the new window.

    The maximum is reached at t just below some window end e_j (slide t up to the earliest end in the
    span: nothing leaves it), where the span holds every release with end >= e_j and start < e_j + H.
    Since every window has start < end, a release with start >= e_j + H also has end >= e_j, so that sum
    is (sum over end >= e_j) - (sum over start >= e_j + H): two sorted suffix sums, O(n log n) time and
    O(n) memory (a day of default releases, 4,500 windows, takes milliseconds, not an n x n matrix)."""
    s_new, e_new = starts[-1], ends[-1]
    cands = ends[(ends <= e_new) & (ends > s_new - horizon_s)]
    touching = _sum_at_or_above(ends, eps, cands) - _sum_at_or_above(starts, eps, cands + horizon_s)
    return float(touching.max())


def spent_in_span(spends: Sequence[Spend], start: datetime, end: datetime) -> float:
    """Epsilon (fixed unit) spent by releases whose windows touch [start, end]."""
    if not spends:
        return 0.0
    starts, ends, eps = _arrays(spends)
    return float(eps[(ends > start.timestamp()) & (starts <= end.timestamp())].sum())


def spent_per_budget(spends: Sequence[Spend], budgets: Sequence[Budget], now: datetime) -> list[tuple[Budget, float]]:
    """Each budget with the epsilon (fixed unit) spent in the span of its length ending ``now``."""
    return [(b, spent_in_span(spends, now - timedelta(seconds=b.horizon_s), now)) for b in budgets]


def check_budgets(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], budgets: Sequence[Budget]) -> None:
    """Raise BudgetExceeded for the first budget that the new release (the arrays' last entry) would break."""
    for budget in budgets:
        spent = worst_span(*arrays, budget.horizon_s)
        if spent > budget.epsilon * (1 + 1e-9):
            raise BudgetExceeded(budget, spent)


# ---------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------
META_KEY = "ledger_meta"


def _meta_line(max_horizon_s: float) -> bytes:
    return json.dumps({META_KEY: {"max_horizon_s": max_horizon_s}}).encode("utf-8") + b"\n"


class Ledger:
    """Append-only ledger in ``path``. ``admit`` checks the budgets and records the spend durably."""

    def __init__(self, path: Path, budgets: Sequence[Budget], *, keep_s: float = 0.0):
        """``keep_s``: the longest horizon a further check (``admit(..., also=...)``) looks back; retention covers it
        like a budget's."""
        self.path = Path(path)
        self.budgets = tuple(budgets)
        with _locked(self.path, create=True) as fd:
            self.spends, recorded = _read_locked(fd, self.path)
            self.max_horizon_s = _horizon_ever(recorded, self.spends, self.budgets, keep_s)
            if recorded is None or self.max_horizon_s > recorded:
                _append(fd, _meta_line(self.max_horizon_s))
            self._seen = _signature(fd)

    @property
    def retention(self) -> timedelta:
        """What compaction keeps: the longest horizon this ledger has ever enforced, + 1 h for clock slack."""
        return timedelta(seconds=self.max_horizon_s + 3600)

    def admit(self, new: Spend, also: Callable[[Sequence[Spend], Spend], None] | None = None) -> None:
        """Record ``new`` (fsynced) if every budget allows it, else raise BudgetExceeded and record nothing.
        ``also(recorded, new)`` is a further check run under the same lock (secure mode's daily composition); it
        raises BudgetExceeded to refuse. Raises OSError if it cannot be recorded (then nothing was recorded
        either), LedgerCorrupt if the file became unreadable."""
        with _locked(self.path, create=True) as fd:
            self._catch_up(fd, new.released_at)
            check_budgets(self._relevant_arrays(new), self.budgets)
            if also is not None:
                also(self._spends, new)
            _append(fd, new.model_dump_json().encode("utf-8") + b"\n")
            self._spends.append(_slim(new))
            self._rows = np.vstack([self._rows, _row(new)])
            self._in_file += 1
            self._seen = _signature(fd)
            self._maybe_compact(new.released_at)

    @property
    def spends(self) -> list[Spend]:
        return self._spends

    @spends.setter
    def spends(self, spends: list[Spend]) -> None:
        """Keeps each release's (start, end, epsilon in the fixed unit) beside it: converting every retained
        release's times at each admit was most of a release's cost after a day of them."""
        self._spends = [_slim(s) for s in spends]
        self._rows = np.array([_row(s) for s in self._spends], dtype=float).reshape(-1, 3)  # (start, end, eps)
        self._in_file = len(self._spends)  # releases in the file; memory may hold fewer (see _maybe_compact)

    def _relevant_arrays(self, new: Spend) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, epsilons) of the releases within retention of ``new``, then ``new`` itself."""
        arr = np.vstack([self._rows, _row(new)])
        keep = arr[:, 1] > (new.window_start - self.retention).timestamp()
        keep[-1] = True
        arr = arr[keep]
        return arr[:, 0], arr[:, 1], arr[:, 2]

    def _catch_up(self, fd: int, now: datetime) -> None:
        """If the file is not as this process left it (another process appended; it was deleted, truncated or
        replaced), re-read it and append every release still within retention that it lost, and the longest
        horizon if it lost that."""
        if _signature(fd) == self._seen:
            return
        on_disk, recorded = _read_locked(fd, self.path)
        if recorded is not None and recorded > self.max_horizon_s:  # another process enforced a longer one
            self.max_horizon_s = recorded
        known = Counter(on_disk)  # a multiset: a clock that repeats itself can make two identical releases
        cutoff = now - self.retention
        lost = []
        for s in self.spends:
            if known[s] > 0:
                known[s] -= 1
            elif s.window_end > cutoff:
                lost.append(s)
        if lost:
            log.warning("privacy ledger %s lost %d release(s) this process recorded (deleted, truncated or "
                        "replaced while running); appending them again", self.path, len(lost))
        if recorded is None or recorded < self.max_horizon_s or lost:
            _append(fd, _meta_line(self.max_horizon_s)
                    + b"".join(s.model_dump_json().encode("utf-8") + b"\n" for s in lost))
        self.spends = on_disk + lost
        self._seen = _signature(fd)

    def _maybe_compact(self, now: datetime) -> None:
        since = (now - self.retention).timestamp()
        within = self._rows[:, 1] > since
        kept = int(within.sum())
        if len(self._rows) > kept + 100:  # memory: releases past retention matter to no check (~1.4 KB each)
            self._spends, self._rows = [s for s, k in zip(self._spends, within) if k], self._rows[within]
        if self._in_file > 2 * kept + 100:
            keep = [s for s, k in zip(self._spends, self._rows[:, 1] > since) if k]
            text = _meta_line(self.max_horizon_s).decode() + "".join(s.model_dump_json() + "\n" for s in keep)
            try:
                atomic_write_text(self.path, text, mode=PRIVATE)
            except OSError as e:  # the release is recorded: compaction can wait for the next one
                log.warning("could not compact the privacy ledger %s (%s); will retry", self.path, e)
                return
            self.spends = keep
            try:
                self._seen = _signature(os.open(self.path, os.O_RDONLY), close=True)
            except OSError:
                self._seen = None


def _horizon_ever(recorded: float | None, spends: Sequence[Spend], budgets: Sequence[Budget],
                  keep_s: float = 0.0) -> float:
    """The longest horizon the ledger must keep serving: the recorded one, the current budgets' and, for a ledger
    from before the record was kept (``recorded`` None), the whole span its lines cover (its old budgets are
    unknown, so it forgets nothing it still holds). At most MAX_HORIZON_S."""
    longest = max((b.horizon_s for b in budgets), default=0.0)
    longest = max(longest, keep_s)
    if recorded is None and spends:
        covered = (max(s.window_end for s in spends) - min(s.window_start for s in spends)).total_seconds()
        longest = max(longest, covered)
    return min(max(longest, recorded or 0.0), MAX_HORIZON_S)


_ALL_FIELDS = frozenset(Spend.model_fields)


def _slim(s: Spend) -> Spend:
    """The same release, sharing one set of field names with every other (pydantic keeps a set per instance:
    728 of a retained release's 1,355 bytes). Equal and hashing alike; already validated."""
    return Spend.model_construct(_fields_set=_ALL_FIELDS, **s.__dict__)


def load_spends(path: Path) -> list[Spend]:
    """Read the ledger, cutting off a torn last line. Raises LedgerCorrupt for any other bad line."""
    return load_ledger(path)[0]


def load_ledger(path: Path) -> tuple[list[Spend], float | None]:
    """The ledger's releases and the longest horizon it records (None: none recorded), cutting off a torn last
    line. Raises LedgerCorrupt for any other bad line."""
    path = Path(path)
    try:
        with _locked(path, create=False) as fd:
            return ([], None) if fd is None else _read_locked(fd, path)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    try:  # readable but not writable (read-only disk, another user): read without cutting anything
        return _parse(Path(path).read_bytes(), path)
    except FileNotFoundError:
        return [], None


@contextmanager
def _locked(path: Path, *, create: bool) -> Iterator[int | None]:
    """A descriptor of the ledger file (read + append) held under an exclusive flock, and verified to still
    be the file at ``path`` (compaction replaces it). With ``create=False``, None when there is no file."""
    while True:
        if create:
            ensure_private_dir(path.parent)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0), 0o600)
        except FileNotFoundError:
            if create:
                raise
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield fd
                return
        finally:
            os.close(fd)  # also releases the flock


def _signature(fd: int, *, close: bool = False) -> tuple[int, int, int]:
    try:
        st = os.fstat(fd)
        return (st.st_ino, st.st_size, st.st_mtime_ns)
    finally:
        if close:
            os.close(fd)


def _read_locked(fd: int, path: Path) -> tuple[list[Spend], float | None]:
    """Parse the whole file behind ``fd``; a torn last line is cut off the file (the caller holds the lock)."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        os.ftruncate(fd, cut)  # drop the torn tail so the next append starts on a fresh line
        os.fsync(fd)
        data = data[:cut]
    return _parse(data, path)


def _parse(data: bytes, path: Path) -> tuple[list[Spend], float | None]:
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # a torn last line was never published: it spends nothing
    spends, horizon = [], None
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and META_KEY in obj:
                h = float(obj[META_KEY]["max_horizon_s"])
                if not 0 <= h <= MAX_HORIZON_S:  # NaN fails too
                    raise ValueError(f"max_horizon_s {h} outside [0, {MAX_HORIZON_S:g}]")
                horizon = h if horizon is None else max(horizon, h)
                continue
            spends.append(Spend.model_validate(obj))
        except (ValueError, TypeError, KeyError, ValidationError) as e:
            raise LedgerCorrupt(
                f"{path} line {number} is unreadable ({e.__class__.__name__}); releases are paused because the "
                "budget spent can no longer be proven. Restore the file from a backup, or move it aside to "
                "start a new ledger (this forgets what was spent)."
            ) from e
    return spends, horizon


def _append(fd: int, data: bytes) -> None:
    """Append ``data`` and fsync; on any failure (disk full mid-line, ...) cut the file back to its old size."""
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass  # the partial line stays torn (no newline): the next read cuts it
        raise


# ---------------------------------------------------------------------------------------------------
# The ledger as the member's spenders use it
# ---------------------------------------------------------------------------------------------------
class Charge(Enum):
    """How a charge to the ledger ended (``LedgerKeeper.charge``)."""

    CHARGED = "charged"  # recorded (fsynced): what it pays for may be released
    OVER_BUDGET = "over budget"  # refused by a budget or a further check: nothing recorded
    NOT_RECORDED = "not recorded"  # the ledger is unusable, not writable, or keeps too little: nothing recorded


class LedgerKeeper:
    """The member's ledger as every spender uses it (the local release, the secure round, the private alerts):
    opened once, releases paused while it is unusable, and each charge's outcome said the same way: once, with
    what to do, never as a traceback. ``open_ledger`` makes the ``Ledger`` (it may raise LedgerCorrupt or
    OSError)."""

    def __init__(self, open_ledger: Callable[[], Ledger], problems: Problems):
        self._open, self.problems = open_ledger, problems
        self.current: Ledger | None = None  # None: not opened yet, or unusable (then releases are paused)

    @property
    def spends(self) -> list[Spend] | None:
        """What the open ledger records; None while it is not open."""
        return None if self.current is None else self.current.spends

    def ledger(self) -> Ledger | None:
        """The ledger, opened once; None (and releases paused, said once) while it is unusable."""
        if self.current is None:
            try:
                self.current = self._open()
                self.problems.clear("ledger", "privacy ledger readable again: releases resume")
            except (LedgerCorrupt, OSError) as e:
                self._unusable(e)
        return self.current

    def _unusable(self, e: Exception) -> None:
        self.current = None  # opened again at the next release, which says when it is readable again
        self.problems.report("ledger", f"privacy ledger unusable, releases paused: {e}", logging.ERROR)

    def charge(self, spend: Spend, *, key: str = "budget", who: str = "",
               resume: str = "releases resume by themselves once the span rolls past",
               also: Callable[[Sequence[Spend], Spend], None] | None = None, needs_s: float = 0.0) -> Charge:
        """Record ``spend`` (fsynced) before what it pays for is released: CHARGED. Otherwise said once: over budget (under ``key``, once per pause whichever budget binds: ``who`` + why + ``resume``), the
        ledger unusable (edited into garbage while running: paused as at start, under ``ledger``), or not
        writable, or keeping less than ``needs_s`` seconds, which ``also`` looks back (under ``key + ":write"``).
        ``also`` is the ledger's further check under its lock (``Ledger.admit``)."""
        ledger = self.ledger()
        if ledger is None:
            return Charge.NOT_RECORDED
        write_key = f"{key}:write"
        try:
            if ledger.retention.total_seconds() < needs_s:
                raise OSError(f"the ledger keeps {ledger.retention.total_seconds():g} s, less than the {needs_s:g} s "
                              "the check of this spend looks back (add a budget with that horizon)")
            ledger.admit(spend, also)
        except BudgetExceeded as e:
            if key not in self.problems.active:  # once per pause, whichever budget binds at each window
                self.problems.report(key, f"{who}{e}; {resume}")
            return Charge.OVER_BUDGET
        except LedgerCorrupt as e:
            self._unusable(e)
            return Charge.NOT_RECORDED
        except OSError as e:
            self.problems.report(write_key, f"{who}cannot record the spend in the privacy ledger {ledger.path} ({e}); "
                                 "nothing is released until it can. Check disk space and the file's permissions.")
            return Charge.NOT_RECORDED
        self.problems.clear(write_key, f"{who}the privacy ledger records spends again")
        self.problems.clear(key, f"{who}privacy budget available again")
        return Charge.CHARGED
