"""Secure aggregation end to end in one process: real members and a real aggregator (the roles' secure modules)
over one shared folder, as if the relay synced everything at once. Real keys, masks, shares and noise; the clock is
driven round by round."""

from __future__ import annotations

import base64
import json
import logging
import math
from datetime import datetime, timezone

import numpy as np
import pytest

import cpu_tracker_member.secure as msec
from cpu_tracker_aggregator.secure import SecureAggregator, missing_for_unmask
from shared.ledger import Ledger
from shared.logs import Problems
from shared.paths import Paths
from shared.secure_schema import Epoch, Inbox, InboxRound, SecureUpload
from shared.settings import Settings

AGG = "agg@example.org"
W = 20.0
log = logging.getLogger("test.secure")


def _t(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


class Net:
    def __init__(self, tmp_path, n, monkeypatch, **overrides):
        self.settings = Settings(aggregator=AGG, mode="secure", interval_s=W, **overrides)
        self.members = [f"m{i:02d}@example.org" for i in range(n)]
        self.sent: dict[tuple[str, int], list[int]] = {}  # what each member's vector was before masking
        real = msec.window_vector

        def spy(raw, epoch, rng=None):
            v = real(raw, epoch, rng)
            self.sent[(self._who, self._round)] = v
            return v

        monkeypatch.setattr(msec, "window_vector", spy)
        self.secure = {}
        shared = tmp_path / "relay"  # every datasite's synced tree, one for all; each has its own private folder
        shared.mkdir()

        def home(email):
            (tmp_path / email).mkdir()
            (tmp_path / email / "datasites").symlink_to(shared)
            return Paths(tmp_path / email, email)

        for m in self.members:
            p = home(m)
            ledger = Ledger(p.ledger_file, self.settings.budgets)
            self.secure[m] = msec.SecureMember(p, self.settings, Problems(log), lambda ledger=ledger: ledger)
        self.agg = SecureAggregator(home(AGG), self.settings, Problems(log))
        self.alive = set(self.members)
        self.values = {m: 10.0 + 3 * i for i, m in enumerate(self.members)}
        self.round = 100_000  # a round far from 0: Unix time 2,000,000 s
        for m in self.members:  # keys published; the aggregator's first tick announces epoch 1 two rounds ahead
            self.secure[m].ensure_key()
        self.agg.tick(_t(self.round * W + 1))
        self.round += 2

    def members_upload(self, who=None):
        r = self.round
        for m in sorted(who if who is not None else self.alive):
            self._who, self._round = m, r
            self.secure[m].publish(self.values[m], _t(r * W), _t((r + 1) * W))

    def aggregator_closes(self):
        self.agg.tick(_t((self.round + 1) * W + self.agg.epoch.deadline_s + 0.5))
        self.round += 1

    def step(self, who=None):
        self.members_upload(who)
        self.aggregator_closes()

    def upload(self, m, r) -> SecureUpload | None:
        p = self.secure[m].paths.upload_file(r)
        return SecureUpload.model_validate_json(p.read_bytes()) if p.exists() else None

    def status(self, r):
        return next((x for x in self.agg.recent if x.round == r), None)


def _exact_sum(net, r, survivors):
    return np.sum([net.sent[(m, r)] for m in survivors], axis=0).tolist()


def test_rounds_complete_and_the_sum_is_exactly_the_values_plus_noise_shares(tmp_path, monkeypatch):
    net = Net(tmp_path, 5, monkeypatch)
    first = net.round
    for _ in range(4):
        net.step()
    fig = net.agg.figure
    assert fig is not None and fig.survivors == 5
    published = [x.round for x in net.agg.recent if x.status == "published"]
    assert first in published and len(published) >= 2
    total = _exact_sum(net, fig.round, net.members)
    assert fig.mean == pytest.approx(total[0] / net.agg.epoch.scale / 5, abs=1e-9)
    true_mean = sum(net.values.values()) / 5
    assert fig.ci95_low < fig.mean < fig.ci95_high
    assert abs(fig.mean - true_mean) < 8 * fig.standard_error + 1
    assert fig.unit == "cpu_window" and fig.epsilon <= 1.25 * (1 + 1e-6)
    assert set(fig.percentiles) >= {"p50", "p90", "p99"}


def _never_unmaskable(net, r):
    """For every member with an upload in round r, the reveals the aggregator got never hold both all its round
    keys and enough shares of its self-mask seed."""
    e = net.agg.epoch
    reveals = {}
    for m in net.members:
        for later in range(r + 1, r + 5):
            up = net.upload(m, later)
            hit = next((x for x in (up.reveals if up else []) if x.round == r), None)
            if hit:
                reveals[m] = hit
                break
    for i in net.members:
        if net.upload(i, r) is None or not net.upload(i, r).vector:
            continue
        keys = sum(1 for j in e.neighbours[i] if j in reveals and i in reveals[j].keys)
        shares = sum(1 for j in e.neighbours[i] if j in reveals and i in reveals[j].shares)
        assert not (keys == len(e.neighbours[i]) and shares >= e.threshold), (i, keys, shares)
    return reveals


@pytest.mark.parametrize("n, gone, fraction", [(5, 1, 0.8), (31, 3, 0.8), (31, 10, 0.8), (31, 10, 0.6)])
def test_members_vanishing_mid_round(tmp_path, monkeypatch, n, gone, fraction):
    """1 member, 10 % and 33 % of the cohort vanish before uploading: the round completes with enough survivors
    (the sum exact over them), or is refused with a reason and nothing is revealed; no value is ever exposed."""
    net = Net(tmp_path, n, monkeypatch, min_survivor_fraction=fraction)
    net.step()
    r, needed = net.round, net.agg.epoch.min_survivors
    vanished = set(net.members[1:1 + gone])
    net.alive -= vanished
    for _ in range(net.agg.epoch.reveal_rounds + 3):
        net.step()
    st = net.status(r)
    assert st is not None
    survivors = sorted(set(net.members) - vanished)
    if len(survivors) >= needed:
        assert st.status in ("published", "failed"), st
        if st.status == "failed":
            assert st.reason
    else:
        assert st.status == "refused" and "fewer than" in st.reason
        for m in survivors:  # nobody revealed anything for a refused round
            for later in range(r + 1, r + 4):
                up = net.upload(m, later)
                assert not any(x.round == r for x in (up.reveals if up else []))
    _never_unmaskable(net, r)


def test_a_member_vanishing_after_its_upload_is_rebuilt_from_its_neighbours(tmp_path, monkeypatch):
    net = Net(tmp_path, 6, monkeypatch)
    net.step()
    r = net.round
    net.step()  # everyone uploads round r
    net.alive.discard(net.members[0])  # ... then m00 vanishes before it can reveal anything for r
    for _ in range(3):
        net.step()
    st = net.status(r)
    assert st.status == "published", st
    assert net.upload(net.members[0], r + 1) is None


class LyingAggregator(SecureAggregator):
    """Tells half of the target's neighbours that it dropped, the other half that it survived (or all of them that
    it dropped), in round ``lie_round``, although its upload arrived."""

    target: str = ""
    lie_round: int = -1
    all_dropped: bool = False

    def _write_inboxes(self):
        super()._write_inboxes()
        rnd = self.rounds.get(self.lie_round)
        if rnd is None or rnd.status != "unmasking":
            return
        e = rnd.epoch
        peers = e.neighbours[self.target]
        told_dropped = peers if self.all_dropped else peers[: len(peers) // 2 + 1]
        for m in e.emails():
            inbox = Inbox.model_validate_json(self.paths.inbox_file(m).read_bytes())
            rounds = []
            for x in inbox.rounds:
                if x.round == self.lie_round and m in told_dropped:
                    x = InboxRound(round=x.round, epoch=x.epoch, status="unmasking",
                                   survivors=[s for s in x.survivors if s != self.target],
                                   dropped=sorted([*x.dropped, self.target]),
                                   sealed={s: v for s, v in x.sealed.items() if s != self.target})
                rounds.append(x)
            self.paths.inbox_file(m).write_bytes(inbox.model_copy(update={"rounds": rounds}).model_dump_json().encode())


@pytest.mark.parametrize("all_dropped", [False, True])
def test_an_aggregator_lying_about_dropouts_learns_nothing(tmp_path, monkeypatch, all_dropped):
    net = Net(tmp_path, 7, monkeypatch)
    liar = LyingAggregator(net.agg.paths, net.settings, Problems(log))
    liar.__dict__.update(net.agg.__dict__)
    net.agg = liar
    net.step()
    r = net.round
    liar.target, liar.lie_round, liar.all_dropped = net.members[3], r, all_dropped
    for _ in range(4):
        net.step()
    reveals = _never_unmaskable(net, r)
    e = net.agg.epoch
    target = net.members[3]
    shares = [j for j in e.neighbours[target] if j in reveals and target in reveals[j].shares]
    assert len(shares) < e.threshold  # its self mask cannot be rebuilt
    if all_dropped:
        assert not shares


def test_late_uploads_for_a_closed_round_do_not_count(tmp_path, monkeypatch):
    net = Net(tmp_path, 5, monkeypatch)
    net.step()
    r = net.round
    late = net.members[0]
    net.step(who=set(net.members) - {late})
    net.round = r  # m00 writes its round-r file after the deadline
    net.members_upload(who={late})
    net.round = r + 1
    for _ in range(3):
        net.step()
    st = net.status(r)
    assert st.survivors == 4


def _write_epoch(net, **changes):
    path = net.agg.paths.epoch_file()
    body = json.loads(path.read_bytes())
    body.update(changes)
    path.write_text(json.dumps(body))


@pytest.mark.parametrize("change, words", [
    ({"threshold": 1}, "not valid"),
    ({"neighbours": {}}, "not valid"),
    ({"aggregator": "other@example.org"}, "not from the aggregator"),
    ({"epsilon": 1.0, "noise": "weaker"}, "more than this member's secure_epsilon"),
    ({"unit": "cpu_second"}, "asks for a member"),
    ({"cohort": "drop-me"}, "not in epoch"),
])
def test_a_bad_epoch_file_is_refused_with_a_clear_line(tmp_path, monkeypatch, caplog, change, words):
    net = Net(tmp_path, 4, monkeypatch)
    e = json.loads(net.agg.paths.epoch_file().read_bytes())
    if change.get("noise") == "weaker":
        change = {"noise": {**e["noise"], "mean_param": e["noise"]["mean_param"] * 4}}
    if change.get("cohort") == "drop-me":
        me = net.members[0]
        change = {"cohort": [c for c in e["cohort"] if c["email"] != me],
                  "neighbours": {k: [p for p in v if p != me] for k, v in e["neighbours"].items() if k != me},
                  "threshold": 2, "min_survivors": 3}
        change["noise"] = {**e["noise"], "shares_for": 3}
    _write_epoch(net, **change)
    m = net.members[0]
    with caplog.at_level(logging.WARNING):
        net.members_upload(who={m})
    assert net.upload(m, net.round) is None
    assert any(words in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_every_secure_release_is_charged_before_its_upload_and_the_day_budget_holds(tmp_path, monkeypatch):
    net = Net(tmp_path, 3, monkeypatch, secure_unit="cpu_day", secure_epsilon=0.5, min_survivor_fraction=1.0)
    e = net.agg.epoch
    assert e.unit == "cpu_day" and e.noise.family == "dgaussian"
    per_day = math.ceil(86400 / W)
    m = net.members[0]
    ledger = net.secure[m].ledger()
    net.step()
    spends = [s for s in ledger.spends if s.mechanism.startswith("secure")]
    assert len(spends) == 1 and spends[0].unit == "cpu_day" and spends[0].survivors == e.noise.shares_for
    # the day's composition as the ledger computes it: the calibrated noise makes a whole day of releases fit
    from shared.secnoise import epsilon_of, release_event

    assert epsilon_of([release_event(e.noise, e.noise.shares_for)] * per_day, e.delta) <= 0.5 * (1 + 1e-6)
    with pytest.raises(msec.DayBudgetExceeded):
        msec.day_check(0.5, e.delta)([spends[0]] * (per_day + per_day // 10), spends[0])


def test_the_secure_figure_reaches_prometheus_in_its_conventions(tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from cpu_tracker_aggregator.metrics import secure_metrics

    net = Net(tmp_path, 4, monkeypatch)
    for _ in range(3):
        net.step()
    fig = net.agg.figure
    assert fig is not None

    class One:
        def collect(self):
            return secure_metrics(fig)

    reg = CollectorRegistry()
    reg.register(One())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples}
    assert samples[("cpu_tracker_secure_network_cpu_ratio", ())] == pytest.approx(fig.mean / 100)
    assert samples[("cpu_tracker_secure_network_cpu_ci95_high_ratio", ())] == pytest.approx(fig.ci95_high / 100)
    assert samples[("cpu_tracker_secure_survivors", ())] == fig.survivors == 4
    assert "p90" in fig.cohort_too_small_for  # 4 members: the noise spans the whole range, so no number is exposed
    for q, iv in fig.percentiles.items():
        key = ("cpu_tracker_secure_fleet_cpu_percentile_ratio", (("bound", "estimate"), ("quantile", q[1:])))
        assert samples.get(key) == (None if q in fig.cohort_too_small_for else pytest.approx(iv.estimate / 100))
    assert samples[("cpu_tracker_secure_recent_rounds", (("status", "published"),))] >= 1


def test_status_says_secure_mode_the_epoch_and_the_secure_releases(tmp_path, monkeypatch):
    from cpu_tracker_member.status import status_text

    net = Net(tmp_path, 3, monkeypatch)
    net.step()
    m = net.members[0]
    text = status_text(net.secure[m].paths, net.settings, _t((net.round + 1) * W))
    assert "Mode: secure" in text and "a member's whole window at epsilon 1.25" in text
    assert f"Epoch {net.agg.epoch.epoch} from {AGG}: 3 members" in text and "this datasite is listed" in text
    assert "Secure releases in the ledger: 1" in text


def test_a_restarted_member_never_reveals_the_other_half_for_an_answered_round(tmp_path, monkeypatch):
    """The never-both rule survives a restart: after answering round r (shares for every survivor), a fresh process
    shown an inbox that now calls a peer dropped reveals no round key for it."""
    net = Net(tmp_path, 5, monkeypatch)
    net.step()
    r = net.round
    net.step()  # round r closed with every member surviving
    net.step()  # uploads of r + 1 carry the reveals for r
    m, peer = net.members[0], net.members[1]
    first = next(x for x in net.upload(m, r + 1).reveals if x.round == r)
    assert peer in first.shares and not first.keys
    old = net.secure[m]
    restarted = msec.SecureMember(old.paths, net.settings, Problems(log), old.ledger)
    restarted.ensure_key()
    restarted.epoch_for(r)
    inbox_path = net.agg.paths.inbox_file(m)
    inbox = Inbox.model_validate_json(inbox_path.read_bytes())
    lie = InboxRound(round=r, epoch=net.agg.epoch.epoch, status="unmasking",
                     survivors=[s for s in net.members if s != peer], dropped=[peer], sealed={})
    inbox_path.write_bytes(inbox.model_copy(update={"rounds": [lie]}).model_dump_json().encode())
    assert not any(x.round == r for x in restarted.reveals(r + 5))


def test_the_private_key_stays_outside_the_synced_tree_owner_only(tmp_path, monkeypatch):
    net = Net(tmp_path, 3, monkeypatch)
    member = net.secure[net.members[0]]
    key = member.paths.secure_private / "x25519.key"
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
    assert member.paths.datasites.resolve() not in key.resolve().parents
    public = member.paths.secure_key_file().read_text()
    assert key.read_bytes().hex() not in public and base64.b64encode(key.read_bytes()).decode() not in public


def test_an_inbox_claiming_too_few_survivors_gets_no_reveal(tmp_path, monkeypatch):
    """A member checks the survivor count itself: an inbox marked "unmasking" with fewer than min_survivors
    survivors is answered with nothing, whatever the aggregator claims."""
    net = Net(tmp_path, 5, monkeypatch)
    net.step()
    r = net.round
    net.step()
    e = net.agg.epoch
    m = net.members[0]
    few = net.members[: e.min_survivors - 1]
    inbox_path = net.agg.paths.inbox_file(m)
    inbox = Inbox.model_validate_json(inbox_path.read_bytes())
    lie = InboxRound(round=r, epoch=e.epoch, status="unmasking", survivors=few,
                     dropped=[x for x in net.members if x not in few], sealed={})
    inbox_path.write_bytes(inbox.model_copy(update={"rounds": [lie]}).model_dump_json().encode())
    assert net.secure[m].reveals(r + 1) == []


def test_a_member_adding_garbage_makes_the_round_refused_not_published(tmp_path, monkeypatch):
    net = Net(tmp_path, 5, monkeypatch)
    net.step()
    r = net.round
    real = msec.window_vector

    def garbage(raw, epoch, rng=None):
        v = real(raw, epoch, rng)
        if net._who == net.members[2] and net._round == r:
            v[0] += 10**9  # far outside what 5 members' means and the noise allow
        net.sent[(net._who, net._round)] = v
        return v

    monkeypatch.setattr(msec, "window_vector", garbage)
    for _ in range(4):
        net.step()
    st = net.status(r)
    assert st.status == "failed" and "implausible" in st.reason
    assert net.agg.figure is None or net.agg.figure.round != r


def test_a_member_reads_an_epoch_of_thousands_of_members(tmp_path, monkeypatch):
    """The epoch of a large cohort (megabytes: every member's key and neighbours) is read whole, and parsed once."""
    from cpu_tracker_aggregator.secure import plan_epoch

    net = Net(tmp_path, 3, monkeypatch)
    m = net.members[0]
    member = net.secure[m]
    filler = base64.b64encode(bytes(range(32))).decode()
    keys = {f"x{i:05d}@example.org": filler for i in range(6000)} | {m: member._public_b64}
    epoch = plan_epoch(9, keys, net.settings, AGG, net.round + 1, _t(net.round * W))
    path = net.agg.paths.epoch_file()
    path.write_bytes(epoch.model_dump_json().encode())
    assert path.stat().st_size > 1 << 20
    assert member.epoch_for(net.round + 1).epoch == 9
    monkeypatch.setattr(Epoch, "model_validate_json", lambda *a, **k: pytest.fail("parsed again"))
    assert member.epoch_for(net.round + 2).epoch == 9


@pytest.mark.parametrize("unit", ["cpu_second", "cpu_window", "cpu_day"])
def test_wrap_around_is_negligible_for_the_largest_sums(unit):
    """The bound in docs/secure-mode.md: 10,000 members' largest values plus 6 standard deviations of the summed
    noise (and of each histogram count) stay below 2^40, against the 2^64 modulus, so no honest sum ever wraps."""
    from cpu_tracker_aggregator.secure import plan_epoch
    from shared.secnoise import noise_sd

    settings = Settings(aggregator=AGG, mode="secure", interval_s=W, secure_unit=unit)
    filler = base64.b64encode(bytes(range(32))).decode()
    e = plan_epoch(1, {f"x{i:05d}@example.org": filler for i in range(10_000)}, settings, AGG, 0, _t(0))
    sd_mean, sd_hist = noise_sd(e.noise, 10_000)
    assert 100 * e.scale * 10_000 + 6 * sd_mean < 2**40
    assert 10_000 + 6 * sd_hist < 2**40
