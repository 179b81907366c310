"""A secure-mode network in one process: real members and a real aggregator (the roles' ``secure`` modules) over one
shared folder, as if the relay synced everything at once. Real identity keys (did.json), masks, shares, signatures
and noise; the clock is driven round by round. Each datasite has its own private folder and key file."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import numpy as np

import cpu_tracker_member.secure as msec
from cpu_tracker_aggregator.secure import SecureAggregator
from shared.privacy.ledger import Ledger, LedgerKeeper
from shared.logs import Problems
from shared.paths import Paths
from shared.wire.secure_schema import SecureUpload, release_seconds
from shared.settings import Settings

AGG = "agg@example.org"
W = 20.0
log = logging.getLogger("test.secure")


def t(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


class Net:
    """``n`` members m00.. and the aggregator; ``step()`` runs one round: uploads at its end, the aggregator's close
    at its deadline, the members' answers (as their inbox poller would), the aggregator's next look at them."""

    def __init__(self, tmp_path, n, monkeypatch, *, aggregator_class=SecureAggregator, start_round=100_000,
                 member_settings: dict | None = None, **overrides):
        self.tmp = tmp_path
        self.settings = Settings(aggregator=AGG, mode="secure", interval_s=W, **overrides)
        self.member_settings = Settings(aggregator=AGG, mode="secure", interval_s=W,
                                        **{**overrides, **(member_settings or {})})
        self.round_s = release_seconds(self.settings.secure_unit, W)
        self.deadline = min(0.5 * self.round_s, 60.0)  # plan_epoch's
        self.members = [f"m{i:02d}@example.org" for i in range(n)]
        self.sent: dict[tuple[str, int], list[int]] = {}  # what each member's vector was before masking
        real = msec.window_vector

        def spy(raw, epoch, rng=None):
            v = real(raw, epoch, rng)
            self.sent[(self._who, self._round)] = v
            return v

        monkeypatch.setattr(msec, "window_vector", spy)
        self.relay = tmp_path / "relay"  # every datasite's synced tree, one for all
        self.relay.mkdir()
        self.secure = {m: self.member(m) for m in self.members}
        self.agg = aggregator_class(self.home(AGG), self.settings, Problems(logging.getLogger("test.secure.agg")))
        self.alive = set(self.members)
        self.observers = []
        self.values = {m: 10.0 + 3 * i for i, m in enumerate(self.members)}
        self.round = start_round
        self.agg.tick(t(self.round * self.round_s + 1))  # the aggregator's identity document
        for m in self.members:  # members pin it and ask to join
            assert self.secure[m].ready(), m
        self.agg.tick(t(self.round * self.round_s + 2))  # the first epoch, two rounds ahead
        self.round += 2

    def home(self, email) -> Paths:
        (self.tmp / email).mkdir(exist_ok=True)
        if not (self.tmp / email / "datasites").exists():
            (self.tmp / email / "datasites").symlink_to(self.relay)
        return Paths(self.tmp / email, email)

    def member(self, email, settings: Settings | None = None) -> msec.SecureMember:
        p = self.home(email)
        s = settings or self.member_settings
        problems = Problems(logging.getLogger(f"test.secure.{email}"))  # the ledger opened as the member opens it
        return msec.SecureMember(p, s, problems, LedgerKeeper(lambda: Ledger(p.ledger_file, s.budgets), problems))

    # -- one round ------------------------------------------------------------------------------------
    def members_upload(self, who=None, r=None):
        """Each member measures the windows of round ``r`` (default: the current one) and publishes them."""
        r = self.round if r is None else r
        start, end = r * self.round_s, (r + 1) * self.round_s
        for m in sorted(who if who is not None else self.alive):
            self._who, self._round = m, r
            at = start
            while at < end:
                self.secure[m].publish(self.values[m], t(at), t(min(at + W, end)))
                at += W

    def aggregator_closes(self, r=None):
        r = self.round if r is None else r
        self.agg.tick(t((r + 1) * self.round_s + self.deadline + 0.5))

    def members_answer(self, who=None):
        for m in sorted(who if who is not None else self.alive):
            self.secure[m].answer()
        for look in self.observers:  # an adversary keeps everything it ever sees
            look()

    def step(self, who=None):
        self.members_upload(who)
        self.aggregator_closes()
        self.members_answer()
        self.agg.tick(t((self.round + 1) * self.round_s + self.deadline + 1.0))
        self.round += 1

    # -- what happened --------------------------------------------------------------------------------
    def upload(self, m, r) -> SecureUpload | None:
        p = self.secure[m].paths.upload_file(r)
        return SecureUpload.model_validate_json(p.read_bytes()) if p.exists() else None

    def status(self, r):
        return next((x for x in self.agg.recent if x.round == r), None)

    def exact_sum(self, r, survivors):
        return np.sum([self.sent[(m, r)] for m in survivors], axis=0).tolist()
