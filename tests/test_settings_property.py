"""Any settings the model accepts run: a member window and an aggregator tick, without an exception.

Settings that pass validation and then crash the loop (a budget horizon of inf or 1e14, a tolerance of 1e15,
``stale_after_s = inf``) are refused by the model instead, in a sentence; this property keeps it so.
"""

from __future__ import annotations

import logging
import math
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cpu_tracker_aggregator.aggregator import Aggregator
from cpu_tracker_member.member import Member, build_report
from shared.atomic import atomic_write_json
from shared.logs import Problems
from shared.paths import Paths
from shared.settings import Settings, settings_warnings

AGG, ME = "agg@example.org", "me@example.org"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

EDGES = [0.0, -0.0, 1e-300, 0.01, 0.5, 1.0, 10.0, 60.0, 3600.0, 86400.0, 86401.0, 366 * 86400.0, 1e9, 1e14, 1e15,
         1e300, math.inf, -math.inf, math.nan, -1.0]


def numbers():
    """Mostly plausible values (so that many settings are accepted and run), plus every kind of extreme."""
    plausible = st.floats(min_value=0.5, max_value=100.0)
    return st.one_of(plausible, plausible, plausible, st.sampled_from(EDGES),
                     st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1e7))


def counts():
    return st.one_of(st.integers(min_value=1, max_value=5000), st.integers(min_value=1, max_value=5000),
                     st.sampled_from([0, 1, 2, 3, 10, 1024, 8640, 10**6, 10**6 + 1, 2**24, 10**20]),
                     st.integers(min_value=-5, max_value=10**7))


budgets = st.lists(st.fixed_dictionaries({"horizon_s": numbers(), "epsilon": numbers()}), max_size=3)
OPTIONAL = {
    "role": st.sampled_from(["auto", "member", "aggregator", "both"]),
    "epsilon": numbers(),
    "interval_s": numbers(),
    "sample_period_s": numbers(),
    "budgets": budgets,
    "tick_s": numbers(),
    "stale_after_s": numbers(),
    "future_tolerance_s": numbers(),
    "min_members": counts(),
    "max_report_bytes": counts(),
    "max_epsilon": numbers(),
    "max_noise_scale": numbers(),
    "history_points": counts(),
}


@hyp_settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.fixed_dictionaries({"aggregator": st.just(AGG)}, optional=OPTIONAL))
def test_accepted_settings_run_a_member_window_and_an_aggregator_tick(values: dict) -> None:
    try:
        s = Settings.model_validate(values)
    except ValidationError:
        return  # refused up front, with a sentence (tests/test_settings_app.py): the loop never sees it
    settings_warnings(s)
    problems = Problems(logging.getLogger("property"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        member = Member(Paths(root, ME), s, problems)
        end = T0 + timedelta(seconds=s.interval_s)
        member.publish(37.5, T0, end)  # published or refused by a budget: either way, no exception
        member.publish(37.5, end, end + timedelta(seconds=s.interval_s))
        agg_paths = Paths(root, AGG)
        for i in range(3):  # peers written as the member app writes them, with these settings
            _, report = build_report(10.0 * i, s.samples_per_window, T0, end, s, random_state=i)
            atomic_write_json(agg_paths.report_file(f"peer{i}@example.org"), report.model_dump(mode="json"))
        agg = Aggregator(agg_paths, s, problems)
        agg.tick(end + timedelta(seconds=1))
        agg.tick(end + timedelta(seconds=1 + s.tick_s))


def test_the_largest_accepted_settings_run() -> None:
    """Every upper bound at once: a 366-day budget, a day of clock-skew tolerance and staleness, the largest
    noise cap and history."""
    values = {"aggregator": AGG, "epsilon": 10.0, "interval_s": 3600.0, "tick_s": 3600.0, "stale_after_s": 86400.0,
              "future_tolerance_s": 86400.0, "min_members": 10**6, "max_report_bytes": 2**24, "max_epsilon": 1000.0,
              "max_noise_scale": 100.0, "history_points": 10**6,
              "budgets": [{"horizon_s": 366 * 86400.0, "epsilon": 1e9}, {"horizon_s": 0.0, "epsilon": 1e9}]}
    test_accepted_settings_run_a_member_window_and_an_aggregator_tick.hypothesis.inner_test(values)
