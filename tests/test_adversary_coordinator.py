"""A lying alert coordinator against the real member (tests/adversary_coordinator.py): every strategy issue 17 lists,
and those found on the way. Each test asserts on the member's own ledger file that it never spends more than its
settings allow (the cap on all monitors, what it agreed to at each generation's first spend) and that every use of
its data is charged there; each fails on the code before pins were kept (the docs say how it was shown)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from shared.wire.schema import MonitorSignal, MonitorSignalsFile
from shared.settings import Settings
from tests.adversary_coordinator import AGG, OUTSIDE, T0, Adversary, Monitor, spent_window_unit
from tests.test_alerts import MEMBERS, Net


def changed_once(caplog, name: str) -> int:
    return sum("changed it after this member's first spend" in r.message and name in r.message
               for r in caplog.records)


def change_when(when, change):
    """Play honestly with a zone the member leaves at once, and call ``change(m)`` once ``when(m, i)``; then go on
    playing."""

    def act(adv, i):
        adv.coordinate()
        m = adv.monitors["cpu_high"]
        if when(m, i) and not getattr(m, "changed", False):
            change(m)
            m.changed, m.stalled = True, 0
            adv.write()

    return act


EXHAUSTED = lambda m, i: m.stalled == 3  # noqa: E731  its b + 1 vectors and b zones are spent
AFTER_FIRST_ROUND = lambda m, i: i == 3  # noqa: E731  a vector, a zone, a breach and the next vector


@pytest.mark.parametrize("field,value,when", [("violations", 8, EXHAUSTED), ("epsilon", 40.0, AFTER_FIRST_ROUND)])
def test_changing_b_or_epsilon_within_a_generation_buys_nothing(tmp_path, monkeypatch, caplog, field, value, when):
    adv = Adversary(tmp_path, monkeypatch)
    adv.show(Monitor("cpu_high", zone=dict(OUTSIDE)))
    spent_before = []
    adv.run(12, change_when(when, lambda m: (spent_before.append(len(adv.spends())), setattr(m, field, value))))
    adv.run(30, lambda a, i: a.coordinate())
    v = adv.verdict()
    assert spent_before and spent_before[0] > 0  # it took part until the change
    v.assert_within()  # within the epsilon shown at its first spend: 20
    assert len(adv.spends()) == spent_before[0]  # and nothing more after the change
    assert changed_once(caplog, "cpu_high") == 1


def test_a_new_generation_each_time_the_member_is_exhausted_stops_at_the_cap(tmp_path, monkeypatch, caplog):
    adv = Adversary(tmp_path, monkeypatch)
    m = Monitor("cpu_high", zone=dict(OUTSIDE))
    adv.show(m)

    shown = []

    def act(adv, i):
        adv.coordinate()
        if m.stalled >= 3:
            adv.new_generation(m, f"g{i}")
            shown.append(m.generation)

    adv.run(240, act)  # 80 minutes of 20 s windows
    v = adv.verdict()
    v.assert_within(lifetime=False)  # each generation is a new agreement: the cap bounds them all
    assert len(shown) > 20 and len(adv.first_epsilon) == 4  # asked again and again; four lifetimes a day
    assert "monitor_budgets cap" in caplog.text


def test_losing_its_state_every_few_windows_for_a_day_stays_within_the_daily_cap(tmp_path, monkeypatch, caplog):
    adv = Adversary(tmp_path, monkeypatch, interval_s=120.0)
    m = Monitor("cpu_high")
    adv.show(m)

    def act(adv, i):
        adv.coordinate()
        if i % 4 == 0:  # the aggregator restarts without its state: a new generation, epoch 0
            adv.new_generation(m, f"lost{i}")

    adv.run(900, act)  # 30 hours of 2-minute windows
    v = adv.verdict()
    v.assert_within(lifetime=False)
    assert v.peak_day > 3.5  # the daily cap is what stopped it (4 on any day)
    assert "over this member's monitor_budgets cap of 4" in caplog.text


def test_flapping_between_two_generations_spends_each_once(tmp_path, monkeypatch):
    adv = Adversary(tmp_path, monkeypatch)
    a, b = Monitor("cpu_high", generation="A", zone=dict(OUTSIDE)), Monitor("cpu_high", generation="B",
                                                                           zone=dict(OUTSIDE))
    state = {"A": a, "B": b}

    def act(adv, i):
        shown = state["A" if i // 3 % 2 == 0 else "B"]
        if adv.monitors["cpu_high"] is not shown:  # back to the other one, asking for a vector again
            shown.epoch, shown.phase = shown.epoch + 1, "collecting"
        adv.monitors["cpu_high"] = shown
        adv.coordinate()

    adv.show(a)
    adv.run(80, act)
    v = adv.verdict()
    v.assert_within()
    assert v.spent_window_unit > 20  # both generations were joined


def test_extending_the_end_after_zones_opened_across_many_monitors(tmp_path, monkeypatch, caplog):
    adv = Adversary(tmp_path, monkeypatch)
    ms = [Monitor(f"m{k}", ends_at=T0 + timedelta(seconds=8 * 20)) for k in range(4)]
    adv.show(*ms)

    def act(adv, i):
        adv.coordinate()
        if i == 5:  # every zone is open: the end moves a month away
            for m in ms:
                m.ends_at += timedelta(days=30)
            adv.write()

    adv.run(40, act)
    v = adv.verdict()
    v.assert_within(lifetime=False)
    assert sum(d.what == "radius" for d in adv.draws) == 4  # each zone was open when the end moved
    assert all(changed_once(caplog, m.name) == 1 for m in ms)


def test_changing_k_mid_zone(tmp_path, monkeypatch, caplog):
    adv = Adversary(tmp_path, monkeypatch)
    m = Monitor("cpu_high", window=4)
    adv.show(m)

    def act(adv, i):
        adv.coordinate()
        if i == 8 and m.phase == "monitoring":
            m.window = 2  # a sensitivity twice the one the zone's radius was drawn for
            adv.write()

    adv.run(20, act)
    assert m.window == 2 and any(d.what == "radius" for d in adv.draws)
    adv.verdict().assert_within()
    assert changed_once(caplog, "cpu_high") == 1


@pytest.mark.parametrize("change", [{"threshold": 50.0}, {"margin": 1.0}, {"kind": "imbalance", "threshold": 30.0}])
def test_changing_what_is_watched_silences_the_member(tmp_path, monkeypatch, caplog, change):
    adv = Adversary(tmp_path, monkeypatch)
    m = Monitor("cpu_high")
    adv.show(m)
    spent = []

    def act(adv, i):
        adv.coordinate()
        if i == 6:
            spent.append(len(adv.spends()))
            for k, value in change.items():
                setattr(m, k, value)
            m.epoch, m.phase = m.epoch + 1, "collecting"  # and asks for a new round under the new definition
            adv.write()

    adv.run(20, act)
    assert spent[0] > 0
    assert len(adv.spends()) == spent[0]  # nothing spent under a definition it did not agree to
    adv.verdict().assert_within()
    assert changed_once(caplog, "cpu_high") == 1


def test_after_a_restart_day_old_windows_are_never_used(tmp_path, monkeypatch):
    adv = Adversary(tmp_path, monkeypatch)
    m = Monitor("cpu_high", window=10)
    adv.show(m)
    adv.run(30)  # a vector and an open zone
    adv.pause(86400)  # the member is stopped for a day; its raw.jsonl still holds the old windows

    def act(adv, i):
        if m.phase == "monitoring" and m.stalled > 0:
            m.epoch, m.phase = m.epoch + 1, "collecting"  # a new round at once
        adv.coordinate()

    restart = adv.now.timestamp()
    adv.run(20, act)
    after = [d for d in adv.draws if d.at > restart]
    assert after, "the member never took part again"
    first = min(d.at for d in after)
    assert first >= restart + m.window * adv.interval - 1e-6  # only once K windows of its own were measured
    adv.verdict().assert_within()


def test_a_quick_restart_keeps_the_windows(tmp_path, monkeypatch):
    """Not an attack: after a restart shorter than one window the last windows still count (no K windows lost)."""
    adv = Adversary(tmp_path, monkeypatch)
    m = Monitor("cpu_high", window=10)
    adv.show(m)
    adv.run(30)
    adv.pause(5)
    m.epoch, m.phase = m.epoch + 1, "collecting"
    adv.write()
    restart = adv.now.timestamp()
    adv.run(3)
    assert any(d.what == "vector" and d.at <= restart + 2 * adv.interval for d in adv.draws)
    adv.verdict().assert_within()


def test_many_monitors_at_once_stop_at_the_cap(tmp_path, monkeypatch, caplog):
    adv = Adversary(tmp_path, monkeypatch)
    adv.show(*[Monitor(f"m{k}") for k in range(10)])
    adv.run(20)
    v = adv.verdict()
    v.assert_within(lifetime=False)
    assert v.peak_instant > 1.5  # some were joined, the rest refused
    assert "monitor_budgets cap of 2" in caplog.text


def test_one_member_flagging_every_epoch_costs_the_others_one_round(tmp_path, caplog):
    """The flagger is a datasite writing its own monitor.json (a noisy vector for every round, and a breach flag for
    every zone); the aggregator and the three honest members are the real code."""
    net = Net(tmp_path, [{"name": "cpu_high", "threshold": 90, "margin": 5, "window": 2, "epsilon": 300,
                          "violations": 4}])
    liar = "liar@example.org"

    def lie() -> None:
        run = net.agg.features["alerts"].runs.get("cpu_high")
        if run is None:
            return
        sig = MonitorSignal(monitor="cpu_high", generation=run.generation, vector_epoch=run.epoch, vector=[0.2],
                            breach_epoch=run.epoch if run.phase == "monitoring" else None)
        path = net.agg_paths.monitor_signals_file(liar)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(MonitorSignalsFile(created_at=net.now, signals=[sig]).model_dump_json())

    for _ in range(40):
        lie()
        dash = net.round(20.0)
    a = net.alert(dash)
    assert a["state"] == "ok" and a["violation_rounds_used"] == 1  # one round, then the liar is muted
    assert "muted" in a["message"]
    s = net.agg.features["alerts"].runs["cpu_high"]
    assert s.muted == [liar]
    split = (300 / 15, 2 * 300 / 12)  # eps / 3(b + 1), 2 eps / 3b
    for m in MEMBERS:
        member, _ = net.members[m]
        spent = spent_window_unit(member.paths.ledger_file, member.settings.interval_s)  # from its own ledger
        assert spent <= 2 * (split[0] + split[1]) + 1e-9  # its own first round, and the one the liar started
    assert caplog.text.count(f"the breach flags of {liar} started") == 1


def test_a_cpu_day_member_keeps_its_alerts_within_its_day(tmp_path, monkeypatch, caplog):
    """Secure mode with the whole-day unit: the monitors' spends on a day count against secure_epsilon (10) with the
    day's secure releases (none here: no epoch is offered), by group privacy: a spend of e per second on S seconds of
    the day costs S e for the whole day."""
    settings = Settings(aggregator=AGG, mode="secure", secure_unit="cpu_day", interval_s=20.0)
    adv = Adversary(tmp_path, monkeypatch, settings=settings)
    adv.show(Monitor("cpu_high"))
    adv.run(30)
    spends = adv.spends()
    assert spends  # its first vector fits in the day: 2 windows x 20 / 9 = 4.4
    for day in {s.window_start.date() for s in spends}:
        lo = datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()
        hi = lo + 86400
        whole_day = sum(max(0.0, min(s.window_end.timestamp(), hi) - max(s.window_start.timestamp(), lo)) * s.epsilon
                        for s in spends)
        assert whole_day <= settings.secure_target * (1 + 1e-9), whole_day
    assert "secure_epsilon 10" in caplog.text  # the zone would take the day past it: refused, said
