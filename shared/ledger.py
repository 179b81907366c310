"""The privacy ledger: every release, recorded before it is published, in a file that survives crashes.

Time blocks play the part of the data blocks of privacy budget scheduling (Luo et al., OSDI 2021): a
release spends its epsilon on the span of time its window covers. A rolling budget (horizon H, cap C)
says that the releases whose windows touch any span of H seconds spend at most C in total. A release is
admitted only if, with it, every budget still holds for every span; otherwise it is never published.
This holds across restarts because the record is appended and fsynced *before* the report is written:
a crash between the two wastes budget, never overspends it.

File format: JSON Lines, one ``Spend`` per line. A torn last line (crash mid-append) is cut off on open;
any other unreadable line stops releases (the budget can no longer be proven) until the owner acts.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from shared.atomic import atomic_write_text
from shared.settings import Budget


class Spend(BaseModel):
    """One release, as the ledger records it. Mechanism-agnostic: any release spends (epsilon, delta)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    released_at: AwareDatetime
    window_start: AwareDatetime
    window_end: AwareDatetime
    epsilon: float = Field(gt=0)
    delta: float = Field(default=0.0, ge=0)
    mechanism: str
    unit: str = "cpu_sample"
    n_samples: int = Field(ge=1)


class LedgerCorrupt(RuntimeError):
    """The ledger has an unreadable line other than a torn last one."""


class BudgetExceeded(RuntimeError):
    def __init__(self, budget: Budget, spent: float):
        super().__init__(
            f"release skipped: it would spend {spent:.4g} epsilon within {budget.horizon_s:g} s, "
            f"over the budget of {budget.epsilon:g}"
        )
        self.budget, self.spent = budget, spent


# ---------------------------------------------------------------------------------------------------
# Pure budget arithmetic
# ---------------------------------------------------------------------------------------------------
def _arrays(spends: Iterable[Spend]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [(s.window_start.timestamp(), s.window_end.timestamp(), s.epsilon) for s in spends]
    arr = np.array(rows, dtype=float).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def worst_span_with(spends: Sequence[Spend], new: Spend, horizon_s: float) -> float:
    """Largest epsilon spent, ``new`` included, by the releases touching any closed span [t, t + H] that
    touches ``new``'s window. Windows are half-open [start, end).

    The maximum is reached at t just below some window end e_j (slide t up to the earliest end in the
    span: nothing leaves it), where the span holds every release with end >= e_j and start < e_j + H."""
    starts, ends, eps = _arrays([*spends, new])
    s_new, e_new = starts[-1], ends[-1]
    cands = ends[(ends <= e_new) & (ends > s_new - horizon_s)]
    touch = (ends[None, :] >= cands[:, None]) & (starts[None, :] < cands[:, None] + horizon_s)
    return float((touch * eps[None, :]).sum(axis=1).max())


def spent_in_span(spends: Sequence[Spend], start: datetime, end: datetime) -> float:
    """Epsilon spent by releases whose windows touch [start, end]."""
    if not spends:
        return 0.0
    starts, ends, eps = _arrays(spends)
    return float(eps[(ends > start.timestamp()) & (starts <= end.timestamp())].sum())


def check_budgets(spends: Sequence[Spend], new: Spend, budgets: Sequence[Budget]) -> None:
    """Raise BudgetExceeded for the first budget that ``new`` would break."""
    for budget in budgets:
        spent = worst_span_with(spends, new, budget.horizon_s)
        if spent > budget.epsilon * (1 + 1e-9):
            raise BudgetExceeded(budget, spent)


# ---------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------
class Ledger:
    """Append-only ledger in ``path``. ``admit`` checks the budgets and records the spend durably."""

    def __init__(self, path: Path, budgets: Sequence[Budget]):
        self.path = Path(path)
        self.budgets = tuple(budgets)
        self.spends: list[Spend] = load_spends(self.path)

    @property
    def retention(self) -> timedelta:
        return timedelta(seconds=max((b.horizon_s for b in self.budgets), default=0) + 3600)

    def admit(self, new: Spend) -> None:
        """Record ``new`` (fsynced) if every budget allows it, else raise BudgetExceeded and record nothing."""
        check_budgets(self._relevant(new), new, self.budgets)
        _append_line(self.path, new.model_dump_json())
        self.spends.append(new)
        self._maybe_compact(new.released_at)

    def _relevant(self, new: Spend) -> list[Spend]:
        horizon = self.retention
        return [s for s in self.spends if s.window_end > new.window_start - horizon]

    def _maybe_compact(self, now: datetime) -> None:
        keep = [s for s in self.spends if s.window_end > now - self.retention]
        if len(self.spends) > 2 * len(keep) + 100:
            atomic_write_text(self.path, "".join(s.model_dump_json() + "\n" for s in keep))
            self.spends = keep


def load_spends(path: Path) -> list[Spend]:
    """Read the ledger, cutting off a torn last line. Raises LedgerCorrupt for any other bad line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:  # drop the torn tail so the next append starts on a fresh line
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        data = data[:cut]
    spends = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            spends.append(Spend.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as e:
            raise LedgerCorrupt(
                f"{path} line {number} is unreadable ({e.__class__.__name__}); releases are paused because the "
                "budget spent can no longer be proven. Restore the file from a backup, or move it aside to "
                "start a new ledger (this forgets what was spent)."
            ) from e
    return spends


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())
