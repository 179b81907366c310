"""The privacy ledger: no rolling budget is ever exceeded, across restarts and torn writes."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ledger import BudgetExceeded, Ledger, LedgerCorrupt, Spend, check_budgets, load_spends, worst_span_with
from shared.settings import Budget

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def spend(start_s: float, end_s: float, eps: float = 0.5) -> Spend:
    return Spend(
        released_at=T0 + timedelta(seconds=end_s),
        window_start=T0 + timedelta(seconds=start_s),
        window_end=T0 + timedelta(seconds=end_s),
        epsilon=eps,
        mechanism="laplace",
        n_samples=200,
    )


def brute_force_worst(spends: list[Spend], new: Spend, horizon: float, step: float = 0.05) -> float:
    """Slide a closed span [t, t + H] over a fine grid; sum epsilon of windows [s, e) it touches."""
    allx = [*spends, new]
    lo = min(s.window_start for s in allx) - timedelta(seconds=horizon + 1)
    hi = max(s.window_end for s in allx) + timedelta(seconds=1)
    worst, t = 0.0, lo
    while t <= hi:
        end = t + timedelta(seconds=horizon)
        if new.window_start <= end and t < new.window_end:
            worst = max(worst, sum(s.epsilon for s in allx if s.window_start <= end and t < s.window_end))
        t += timedelta(seconds=step)
    return worst


def test_back_to_back_windows_spend_each_instant_once():
    spends = [spend(20 * i, 20 * (i + 1)) for i in range(10)]
    check_budgets(spends[:-1], spends[-1], [Budget(horizon_s=0, epsilon=0.5)])  # no instant is spent twice


def test_overlapping_window_is_refused():
    """A clock stepped back would make a window re-use time already spent: refused."""
    with pytest.raises(BudgetExceeded, match="over the budget of 0.5"):
        check_budgets([spend(0, 20)], spend(10, 30), [Budget(horizon_s=0, epsilon=0.5)])


def test_rolling_budget_counts_windows_touching_a_span():
    # a closed 60 s span can touch 4 back-to-back 20 s windows: [19.9, 79.9] touches 0-20 ... 60-80
    spends = [spend(20 * i, 20 * (i + 1)) for i in range(3)]
    assert worst_span_with(spends, spend(60, 80), 60) == pytest.approx(2.0)
    check_budgets(spends, spend(60, 80), [Budget(horizon_s=60, epsilon=2.0)])
    with pytest.raises(BudgetExceeded):
        check_budgets(spends, spend(60, 80), [Budget(horizon_s=60, epsilon=1.9)])


windows = st.lists(
    st.tuples(st.integers(0, 200), st.integers(1, 40), st.sampled_from([0.25, 0.5, 1.0])), min_size=0, max_size=6
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(windows, st.tuples(st.integers(0, 200), st.integers(1, 40)), st.sampled_from([0.0, 5.0, 30.0, 60.0]))
def test_worst_span_equals_brute_force(existing, new, horizon):
    """The closed-form maximum equals a brute-force slide over a grid finer than any window edge."""
    spends = [spend(s, s + d, e) for s, d, e in existing]
    n = spend(new[0], new[0] + new[1])
    assert worst_span_with(spends, n, horizon) == pytest.approx(brute_force_worst(spends, n, horizon))


def test_budget_holds_across_restarts(tmp_path):
    """Exhaust an hourly budget, 'restart' (new Ledger on the same file): still refused, nothing recorded."""
    path = tmp_path / "ledger.jsonl"
    budgets = [Budget(horizon_s=3600, epsilon=2.0)]
    ledger = Ledger(path, budgets)
    for i in range(4):
        ledger.admit(spend(20 * i, 20 * (i + 1)))
    again = Ledger(path, budgets)
    assert len(again.spends) == 4
    with pytest.raises(BudgetExceeded):
        again.admit(spend(80, 100))
    assert len(load_spends(path)) == 4


def test_torn_last_line_is_cut_and_appending_continues(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, [Budget(horizon_s=0, epsilon=1)])
    ledger.admit(spend(0, 20))
    with open(path, "ab") as f:
        f.write(spend(20, 40).model_dump_json().encode()[:37])  # crash mid-append: no newline
    reopened = Ledger(path, [Budget(horizon_s=0, epsilon=1)])
    assert len(reopened.spends) == 1  # the torn release was never published: it is not counted
    reopened.admit(spend(20, 40))
    assert [s.window_start for s in load_spends(path)] == [spend(0, 20).window_start, spend(20, 40).window_start]


def test_corrupt_middle_line_stops_releases(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(spend(0, 20).model_dump_json() + "\n{garbage\n" + spend(20, 40).model_dump_json() + "\n")
    with pytest.raises(LedgerCorrupt, match="line 2"):
        Ledger(path, [])


def test_compaction_keeps_every_spend_a_budget_can_still_see(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, [Budget(horizon_s=60, epsilon=10)])
    admitted = [spend(20 * i, 20 * (i + 1), eps=0.01) for i in range(600)]  # 200 min; retention 60 s + 1 h
    for s in admitted:
        ledger.admit(s)
    kept = load_spends(path)
    visible = [s for s in admitted if s.window_end > admitted[-1].released_at - ledger.retention]
    assert len(kept) < len(admitted)
    assert set(visible) <= set(kept)
