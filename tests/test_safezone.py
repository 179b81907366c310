"""The safe-zone algorithms (shared/privacy/safezone.py) against hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from shared.privacy import safezone as sz
from shared.privacy.safezone import Account, Lifecycle, MonitorSpec, Split

MEAN = MonitorSpec(name="cpu_high", kind="mean", threshold=85, margin=5, window=10, epsilon=6, violations=3)
IMB = MonitorSpec(name="cpu_imbalance", kind="imbalance", threshold=25, margin=5, window=10, epsilon=6, violations=3)


def test_local_vectors_and_sensitivities():
    assert sz.local_vector("mean", [20, 40, 150]).tolist() == pytest.approx([(20 + 40 + 100) / 300])
    assert sz.local_vector("imbalance", [50, 50]).tolist() == pytest.approx([0.5, 0.25])
    assert sz.sensitivity("mean", 10) == pytest.approx((0.1, 0.1))
    assert sz.sensitivity("imbalance", 10) == pytest.approx((0.3, math.sqrt(5) / 10))


def test_sensitivity_bounds_every_change_of_one_window_mean():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        k = int(rng.integers(1, 20))
        w = rng.uniform(0, 100, k)
        w2 = w.copy()
        w2[rng.integers(k)] = rng.uniform(0, 100)
        l1, l2 = sz.sensitivity("imbalance", k)
        d = sz.local_vector("imbalance", w) - sz.local_vector("imbalance", w2)
        assert np.abs(d).sum() <= l1 + 1e-12 and np.linalg.norm(d) <= l2 + 1e-12


def test_thresholds_in_f_units():
    th = sz.thresholds(MEAN)  # T = 85, m = 5
    assert (th.lo, th.mid, th.hi) == pytest.approx((0.80, 0.825, 0.85))
    th = sz.thresholds(IMB)  # a standard deviation of 25 points, m = 5: compared as variances
    assert (th.lo, th.mid, th.hi) == pytest.approx((0.04, 0.225**2, 0.0625))


def test_ball_mean_ok_is_the_half_line_below_the_threshold():
    # v^ = 0.4, ok zone bounded by T + m = 0.9: the ball of radius R_MAX tangent at 0.9, [0.9 - 2 R, 0.9]
    c, r = sz.fit_ball("mean", "ok", 0.9, [0.4])
    assert r == pytest.approx(sz.R_MAX) and c[0] + r == pytest.approx(0.9)


def test_ball_mean_firing_is_the_half_line_above_the_threshold():
    c, r = sz.fit_ball("mean", "firing", 0.8, [0.95])
    assert r == pytest.approx(sz.R_MAX) and c[0] - r == pytest.approx(0.8)


def test_ball_imbalance_ok_below_the_parabola_is_tangent_at_the_vertex():
    # v^ = (0, 0), boundary y = x^2 + 0.09, nearest point (0, 0.09); the parabola curves away from any ball
    # below its tangent there, so the ball grows to R_MAX: centre (0, 0.09 - R)
    c, r = sz.fit_ball("imbalance", "ok", 0.09, [0.0, 0.0])
    assert r == pytest.approx(sz.R_MAX) and c.tolist() == pytest.approx([0.0, 0.09 - sz.R_MAX])


def test_ball_imbalance_firing_above_the_parabola_stops_at_its_curvature():
    # v^ = (0, 0.5) above y = x^2 + 0.04: nearest point the vertex, r0 = 0.46; growing upwards the vertex stays
    # nearest while the radius is at most the curvature radius 1/2, then points (+-x, x^2 + 0.04) come closer:
    # the osculating circle, centre (0, 0.54), radius 1/2
    c, r = sz.fit_ball("imbalance", "firing", 0.04, [0.0, 0.5])
    assert c.tolist() == pytest.approx([0.0, 0.54], abs=1e-6) and r == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("state,tau,v", [("ok", 0.09, (0.5, 0.26)), ("firing", 0.04, (0.5, 0.45)),
                                         ("ok", 0.0625, (0.9, 0.82)), ("firing", 0.0625, (0.3, 0.2))])
def test_ball_imbalance_lies_inside_its_region_and_contains_the_global_vector(state, tau, v):
    c, r = sz.fit_ball("imbalance", state, tau, v)
    assert np.linalg.norm(np.asarray(v) - c) <= r + 1e-12
    r0, _ = sz.region_distance("imbalance", state, tau, v)
    assert r >= r0 - 1e-12  # never smaller than the ball centred at v^
    for a in np.linspace(0, 2 * math.pi, 720):
        p = c + r * np.array([math.cos(a), math.sin(a)]) * (1 - 1e-9)
        f = p[1] - p[0] ** 2
        assert (f <= tau + 1e-9) if state == "ok" else (f >= tau - 1e-9)


def test_drift_assignment_centres_average_to_the_global_centre():
    v_hat, centre = np.array([0.4, 0.2]), np.array([0.3, -0.1])
    noisy = [[0.5, 0.2], [0.4, 0.5], [0.3, -0.1]]  # their mean is v^
    offsets = sz.assign_offsets(centre, v_hat, noisy, balance=0)
    assert all(o.tolist() == pytest.approx([-0.1, -0.3]) for o in offsets)
    offsets = sz.assign_offsets(centre, v_hat, noisy, balance=0.5)
    # o_i = (c - v^) + 0.5 (v^ - v~_i): member 0 sits 0.1 above v^ in x, so its centre moves 0.05 down
    assert offsets[0].tolist() == pytest.approx([-0.15, -0.3])
    assert np.mean([v_hat + o for o in offsets], axis=0).tolist() == pytest.approx(centre.tolist())


def test_a_member_whose_drift_stays_in_its_zone_keeps_the_global_condition():
    # three members, all zones respected: the average drift vector is inside the ball, hence below T + m
    rng = np.random.default_rng(3)
    ref = rng.uniform(0.1, 0.5, (3, 1))
    noisy = ref + rng.normal(0, 0.01, ref.shape)
    a = sz.assign(MEAN, noisy)
    offsets = sz.assign_offsets(a.centre, a.v_hat, noisy)
    for _ in range(500):
        now = np.clip(ref + rng.uniform(-0.5, 0.5, ref.shape), 0, 1)
        if all(sz.drift_distance(now[i], ref[i], offsets[i]) <= a.radius for i in range(3)):
            assert np.mean(now) + (a.v_hat[0] - ref.mean()) <= 0.85 + 1e-12


def test_exponential_mechanism_probabilities():
    l2, eps = 0.1, 0.5
    assert sz.outside_probability(0.3, 0.3, epsilon=eps, l2=l2) == pytest.approx(0.5)
    # P(outside) / P(inside) = exp(eps (d - r^) / 2 l2): d - r^ = 2 l2 ln 3 / eps gives 3 : 1
    d = 0.3 + 2 * l2 * math.log(3) / eps
    assert sz.outside_probability(d, 0.3, epsilon=eps, l2=l2) == pytest.approx(0.75)
    assert sz.outside_probability(0.3 - (d - 0.3), 0.3, epsilon=eps, l2=l2) == pytest.approx(0.25)
    assert sz.outside_probability(-1e6, 0.0, epsilon=eps, l2=l2) == 0.0  # no overflow


def test_exponential_mechanism_draws_match_their_probability():
    n, d = 4000, 0.3 + 2 * 0.1 * math.log(3) / 0.5
    rs = np.random.RandomState(7)
    hits = sum(sz.draw_outside(d, 0.3, epsilon=0.5, l2=0.1, random_state=rs) for _ in range(n))
    assert abs(hits / n - 0.75) <= 6 * math.sqrt(0.75 * 0.25 / n)  # 6 sigma: never flakes


def test_noisy_radius_and_vector_have_their_laplace_scale():
    rs = np.random.RandomState(11)
    radii = np.array([sz.draw_radius(0.5, epsilon=2.0, l2=0.1, random_state=rs) for _ in range(4000)])
    # Laplace(b = 0.05): mean 0.5, mean absolute deviation b
    assert abs(radii.mean() - 0.5) <= 6 * math.sqrt(2) * 0.05 / math.sqrt(4000)
    assert np.abs(radii - 0.5).mean() == pytest.approx(0.05, rel=0.1)
    v = sz.draw_vector([0.2, 0.04], epsilon=1.0, l1=0.3, random_state=rs)
    assert len(v) == 2 and all(math.isfinite(x) for x in v)


def test_budget_split():
    s = sz.split(MEAN)  # eps 6, b 3
    assert s.vector == pytest.approx(6 / 12) and s.radius == pytest.approx(6 / 9) and s.check == pytest.approx(6 / 9)
    assert (MEAN.violations + 1) * s.vector + MEAN.violations * s.zone == pytest.approx(MEAN.epsilon)


def test_budget_accounting_of_a_whole_run_never_exceeds_epsilon():
    """A whole lifetime: initialisation, b violation rounds, exhaustion. The member's account ends at exactly
    epsilon and refuses any further vector or zone, whatever the coordinator asks."""
    s, life, acct = sz.split(MEAN), Lifecycle(), Account()
    for _ in range(MEAN.violations):
        assert life.phase == "collecting" and acct.can_send_vector(s)
        acct = Account(acct.vectors + 1, acct.zones)  # Algorithm 1 / recovery vector
        life = life.on_collected(MEAN)
        assert life.phase == "monitoring" and acct.can_open_zone(s)
        acct = Account(acct.vectors, acct.zones + 1)  # Algorithm 3: zone opened (radius + checks)
        life = life.on_violation(MEAN)
    acct = Account(acct.vectors + 1, acct.zones)  # the last violation round's vector
    life = life.on_collected(MEAN)
    assert life == Lifecycle(epoch=3, phase="exhausted", used=3)
    assert acct == Account(vectors=4, zones=3) and acct.spent(s) == pytest.approx(MEAN.epsilon)
    assert not acct.can_send_vector(s) and not acct.can_open_zone(s)
    with pytest.raises(ValueError, match="only possible while monitoring"):
        life.on_violation(MEAN)


def test_threshold_flipping_with_margins():
    th = sz.thresholds(MEAN)  # T = 0.85, m = 0.05: decided at T - m/2 = 0.825
    a = sz.assign(MEAN, [[0.83], [0.83]])  # above T - m/2: firing, and the zone watches for f < T - m = 0.80
    assert a.state == "firing" and a.centre[0] - a.radius == pytest.approx(th.lo)
    b = sz.assign(MEAN, [[0.82], [0.82]])  # below T - m/2: ok, the zone watches for f > T = 0.85
    assert b.state == "ok" and b.centre[0] + b.radius == pytest.approx(th.hi)
    # the margin always leaves room: v^ lies at least m/2 inside its zone, on either side of the decision
    assert a.v_hat[0] - (a.centre[0] - a.radius) == pytest.approx(0.03)
    assert b.centre[0] + b.radius - b.v_hat[0] == pytest.approx(0.03)
    for f in np.linspace(0.01, 0.99, 99):
        z = sz.assign(MEAN, [[f]])
        room = (z.centre[0] + z.radius - f) if z.state == "ok" else (f - (z.centre[0] - z.radius))
        assert room >= 0.025 - 1e-12


def test_monitor_settings_are_checked_with_names():
    with pytest.raises(ValidationError, match="standard deviation"):
        MonitorSpec(name="x", kind="imbalance", threshold=60)
    with pytest.raises(ValidationError, match="threshold - margin"):
        MonitorSpec(name="x", kind="mean", threshold=5, margin=5)
    with pytest.raises(ValidationError, match="name"):
        MonitorSpec(name="Bad Name", kind="mean", threshold=90)
    with pytest.raises(ValueError, match="epsilon must be finite"):
        sz.outside_probability(0, 0, epsilon=0, l2=1)


# ---------------------------------------------------------------------------------------------------
# Spending: windows with their times, the cap on all monitors, the day unit's composition
# ---------------------------------------------------------------------------------------------------
from datetime import datetime, timedelta, timezone  # noqa: E402

from shared.privacy.ledger import Ledger, Spend, worst_span  # noqa: E402
from shared.privacy import Budget  # noqa: E402
from shared.settings import Settings  # noqa: E402

T = datetime(2026, 3, 1, tzinfo=timezone.utc)


def windows(*spans: tuple[float, float]) -> list[sz.WindowMean]:
    return [sz.WindowMean(a, b, 50.0) for a, b in spans]


def test_usable_windows_are_recent_following_and_long_enough():
    w = windows(*[(20 * i, 20 * i + 20) for i in range(5)])
    assert sz.usable_windows(w, 3, seconds=20, interval_s=20) == w[-3:]
    assert sz.usable_windows(w, 6, seconds=20, interval_s=20) is None  # too few
    assert sz.usable_windows(w, 3, seconds=21, interval_s=20) is None  # shorter than the seconds charged for
    gap = windows((0, 20), (20, 40), (55, 75))  # a quick restart: 15 s missing, less than one window
    assert sz.usable_windows(gap, 3, seconds=20, interval_s=20) == gap
    stale = windows((0, 20), (20, 40), (86400, 86420))  # a day apart: never together
    assert sz.usable_windows(stale, 3, seconds=20, interval_s=20) is None
    assert sz.usable_windows(stale, 1, seconds=20, interval_s=20) == stale[-1:]
    two_gaps = windows((0, 20), (32, 52), (64, 84))  # 12 + 12 s: more than one window in all
    assert sz.usable_windows(two_gaps, 3, seconds=20, interval_s=20) is None
    aligned = windows((0, 19.995), (19.995, 40.003), (40.003, 59.99))  # secure rounds: wall-clock jitter
    assert sz.usable_windows(aligned, 3, seconds=20, interval_s=20) == aligned
    assert sz.usable_windows(windows((0, 19.8), (19.8, 40)), 2, seconds=20, interval_s=20) is None
    overlap = windows((0, 20), (10, 30))
    assert sz.usable_windows(overlap, 2, seconds=20, interval_s=20) is None


def spend(mech: str, start: float, end: float, eps: float, unit: str = "cpu_second") -> Spend:
    return Spend(released_at=T + timedelta(seconds=end), window_start=T + timedelta(seconds=start),
                 window_end=T + timedelta(seconds=end), epsilon=eps, mechanism=mech, unit=unit, n_samples=20)


def test_a_zones_lines_count_once_and_other_spends_are_left_out():
    lines = [spend("safezone_zone:cpu_high:a", 0, 60, 0.1), spend("safezone_zone:cpu_high:a", 60, 80, 0.1),
             spend("safezone_vector:cpu_high:b", 0, 40, 0.05), spend("safezone_zone", 0, 1000, 0.2),
             spend("laplace", 0, 20, 5.0)]
    starts, ends, eps = sz.monitor_rows(lines)
    rows = sorted(zip((ends - starts).tolist(), eps.tolist()))  # all start at 0: (length, epsilon)
    assert starts.tolist() == [T.timestamp()] * 3
    assert rows == [(40.0, 0.05), (80.0, 0.1), (1000.0, 0.2)]  # the older line without an id stands alone


@pytest.mark.parametrize("horizon", [0.0, 30.0, 100.0])
def test_heaviest_span_is_the_brute_force_maximum(horizon):
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        starts = rng.integers(0, 100, n).astype(float)
        ends = starts + rng.integers(1, 50, n)
        eps = rng.uniform(0.1, 1, n)
        brute = max(float(eps[(ends > t) & (starts <= t + horizon)].sum())
                    for t in np.concatenate([starts, ends - 1e-6]))
        assert sz.heaviest_span(starts, ends, eps, horizon) == pytest.approx(brute)
        # the ledger's own arithmetic agrees on the spans that touch the last row
        assert worst_span(starts, ends, eps, horizon) <= sz.heaviest_span(starts, ends, eps, horizon) + 1e-12


def test_the_cap_counts_every_monitor_and_each_zone_once():
    check = sz.cap_check((Budget(horizon_s=0, epsilon=1.0), Budget(horizon_s=3600, epsilon=1.5)))
    recorded = [spend("safezone_zone:a:z1", 0, 20, 0.4), spend("safezone_zone:a:z1", 20, 40, 0.4),
                spend("laplace", 0, 40, 5.0)]
    check(recorded, spend("safezone_zone:a:z1", 40, 60, 0.4))  # the same zone going on: 0.4, not 1.2
    check(recorded, spend("laplace", 40, 60, 50.0))  # releases are the ledger's budgets' business
    check(recorded, spend("safezone_vector:b:v1", 30, 50, 0.6))  # 0.4 + 0.6 on [30, 40): at the cap
    with pytest.raises(sz.MonitorCapExceeded, match="one instant"):
        check(recorded, spend("safezone_vector:b:v1", 30, 50, 0.61))
    later = [*recorded, spend("safezone_vector:b:v1", 30, 50, 0.6)]
    with pytest.raises(sz.MonitorCapExceeded, match="3600 s, over this member's monitor_budgets cap of 1.5"):
        check(later, spend("safezone_vector:c:v2", 2000, 2020, 0.6))  # another name, another hour: same cap


def test_the_day_unit_composes_the_monitors_spends_by_group_privacy():
    day = T
    vector = spend("safezone_vector:a:v", 0, 900, 0.1)  # 45 windows of 20 s at 2 / 20 per second
    assert sz.day_epsilon([vector], day, day + timedelta(days=1)) == pytest.approx(900 * 0.1)
    assert sz.day_epsilon([vector], day + timedelta(days=1), day + timedelta(days=2)) == 0
    # a zone: the lesser of its seconds in the day and twice its first line (2K windows' worth)
    zone = [spend("safezone_zone:a:z", 0, 920, 0.2), *[spend("safezone_zone:a:z", 920 + 20 * i, 940 + 20 * i, 0.2)
                                                      for i in range(100)]]
    assert sz.day_epsilon(zone, day, day + timedelta(days=1)) == pytest.approx(2 * 920 * 0.2)
    assert sz.day_epsilon(zone[:3], day, day + timedelta(days=1)) == pytest.approx(960 * 0.2)
    assert sz.day_epsilon([spend("laplace", 0, 20, 5.0)], day, day + timedelta(days=1)) == 0


def test_the_cpu_day_check_holds_the_monitors_spends():
    from cpu_tracker_member.secure import DayBudgetExceeded, day_check

    check = day_check(10.0, 1e-6)
    small = spend("safezone_vector:a:v", 0, 40, 0.1)  # 40 s x 0.1: 4 for the whole day
    check([], small)
    with pytest.raises(DayBudgetExceeded, match="over secure_epsilon 10"):
        check([small, spend("safezone_vector:a:w", 100, 140, 0.1)], spend("safezone_vector:a:x", 200, 240, 0.1))


def test_the_ledger_keeps_what_the_cap_looks_back_on(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", (Budget(horizon_s=0, epsilon=10.0),), keep_s=86400)
    assert ledger.retention >= timedelta(days=1)
    assert Ledger(tmp_path / "other.jsonl", (Budget(horizon_s=0, epsilon=10.0),)).retention == timedelta(hours=1)


def test_an_empty_monitor_cap_is_refused_with_a_sentence():
    with pytest.raises(ValidationError, match="join_monitors = false"):
        Settings(aggregator="agg@example.org", monitor_budgets=())
