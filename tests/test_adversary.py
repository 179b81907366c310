"""Every strategy an aggregator or the relay can play against a member, one per test, against real members
(``tests/adversary.py``). After each, the adversary collects everything it got and tries to unmask each member alone:
the victim's value is never recovered, except under the documented condition (t Sybil neighbours), where it is, exactly.

On main (protocol version 1) each of these strategies that applies opens the victim or is accepted unseen: files
were not signed (a forged inbox or epoch was acted on), a member revealed per whatever inbox it was given with no
consistency round (the lie to the victim and to both opened it), the never-both record was keyed by (epoch, round)
with round keys bound only to the round (a round replayed under a new epoch number opened it), and it forgot rounds
after 200 (an old round asked again).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets

import pytest

import cpu_tracker_member.secure as msec
from shared.secure import identity
from shared.wire.secure_schema import (
    Epoch,
    Inbox,
    SecureAnswers,
    b64,
    b64_bytes,
    epoch_hash,
    mac_file,
    message,
    read_mac,
    signed_file,
)
from shared.wire.schema import utc_now
from tests.adversary import Adversary, LyingAggregator, entry_for, sent
from tests.secure_harness import AGG, Net, t


def recovered(net: Net, adv: Adversary, r: int, h: bytes | None = None) -> dict[str, list[int]]:
    """The members whose exact value (vector plus noise share) the adversary recovered in round r."""
    return {m: v for m, v in adv.opened(r, h).items() if (m, r) in net.sent and v == sent(net, m, r)}


def lying_net(tmp_path, monkeypatch, n, **kw) -> tuple[Net, Adversary, str]:
    net = Net(tmp_path, n, monkeypatch, aggregator_class=LyingAggregator, **kw)
    net.step()  # one honest round first
    return net, Adversary(net), net.members[3]


def play(net: Net, rounds: int = 3, answer=None) -> None:
    for _ in range(rounds):
        net.members_upload()
        net.aggregator_closes()
        net.members_answer(answer)
        net.agg.tick(t((net.round + 1) * net.round_s + net.deadline + 1.0))
        net.round += 1


def neighbours(net: Net, m: str) -> list[str]:
    return net.agg.epoch.neighbours(m)


@pytest.mark.parametrize("n", [5, 40])
@pytest.mark.parametrize("how_many", ["t", "all"])
def test_the_dropout_lie_to_the_victim(tmp_path, monkeypatch, n, how_many):
    """The victim is told that t (or all) of its neighbours dropped; they are told the truth and reveal shares of its
    seed. The victim's view then disagrees with theirs, it finds no t consistent signers and reveals nothing: the
    round keys with them stay secret."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, n)
    r, nbrs, th = net.round, neighbours(net, victim), net.agg.epoch.threshold
    net.agg.lies[r] = {victim: set(nbrs[:th] if how_many == "t" else nbrs)}
    play(net)
    assert r in net.secure[victim]._state.views and r not in net.secure[victim]._state.answered
    assert recovered(net, adv, r) == {}


@pytest.mark.parametrize("n", [5, 40])
def test_the_dropout_lie_to_its_neighbours(tmp_path, monkeypatch, n):
    """t of the victim's neighbours are told it dropped (they reveal their round keys with it), the others that it
    survived (they reveal shares of its seed): fewer than t shares, so its self mask stays."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, n)
    r, nbrs, th = net.round, neighbours(net, victim), net.agg.epoch.threshold
    net.agg.lies[r] = {j: {victim} for j in nbrs[:th]}
    play(net)
    assert recovered(net, adv, r) == {}


@pytest.mark.parametrize("n", [5, 40])
@pytest.mark.parametrize("rest", ["truth", "victim dropped"])
def test_the_dropout_lie_to_both(tmp_path, monkeypatch, n, rest):
    """The attack of issue 18: the victim is told that t neighbours dropped (so that it reveals its round keys with
    them) and those t are told the truth (so that they reveal shares of its seed); the other neighbours are told the
    truth or that the victim dropped (so that they reveal their keys too). The victim's view is consistent with no t
    of them: it reveals nothing."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, n)
    r, nbrs, th = net.round, neighbours(net, victim), net.agg.epoch.threshold
    lies = {victim: set(nbrs[:th])}
    if rest == "victim dropped":
        lies |= {j: {victim} for j in nbrs[th:]}
    net.agg.lies[r] = lies
    play(net)
    assert r not in net.secure[victim]._state.answered
    assert recovered(net, adv, r) == {}


def test_a_round_replayed_under_a_new_epoch(tmp_path, monkeypatch, caplog):
    """Round r completes under epoch E; the aggregator publishes E' (a new number, the same cohort and seed) covering
    round r again and asks about r with the lie to both. Round keys and shares are bound to E's hash, a round a member
    used is never used again (not even re-uploaded), and a round used under E is not answered under E'."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, 5)
    r = net.round
    play(net)
    assert net.status(r).status == "published"
    e = net.agg.epoch
    replay = Epoch.model_validate({**e.model_dump(), "epoch": e.epoch + 1, "first_round": r, "created_at": utc_now()})
    adv.write_epoch(replay)
    before = net.secure[victim].paths.upload_file(r).read_bytes()
    with caplog.at_level(logging.WARNING):
        net.members_upload(r=r)  # asked to take part in round r again
    assert net.secure[victim].paths.upload_file(r).read_bytes() == before
    assert any("never used twice" in x.getMessage() for x in caplog.records)
    rnd = net.agg.rounds[r]
    h2 = net.secure[victim].epoch_for(r + 1)[1]
    assert h2 != rnd.h
    nbrs, th = neighbours(net, victim), e.threshold
    lies = {victim: set(nbrs[:th])}
    replayed = rnd.__class__(**{**rnd.__dict__, "h": h2, "revealed": set()})
    for m in net.members:
        adv.write_inbox(m, [entry_for(replayed, m, told_dropped=lies.get(m, set()))])
    with caplog.at_level(logging.WARNING):
        net.members_answer()
    assert any("asked about again under a new one" in x.getMessage() for x in caplog.records)
    assert recovered(net, adv, r) == {} and recovered(net, adv, r, h2) == {}


WEAKENED = {
    "cohort": (lambda e: {"cohort": e.cohort[:3] + [e.cohort[4]], "degree": 3, "threshold": 2, "min_survivors": 4},
               {"min_cohort": 5}, "needs at least 5"),
    "degree": (lambda e: {"degree": 2, "threshold": 2}, {}, "neighbours; this member's rule asks for 4"),
    "threshold": (lambda e: {"threshold": 2}, {}, "not valid"),
    "min_survivors": (lambda e: {"min_survivors": 4, "noise": {**e.noise.model_dump(), "shares_for": 4}},
                      {"min_survivor_fraction": 1.0}, "survivors a round; this member needs at least 5"),
    "window": (lambda e: {"window_s": 10.0}, {}, "10 s rounds, this member 20 s"),
    "unit": (lambda e: {"unit": "cpu_second"}, {}, "this member asks for a member's whole window"),
    "noise": (lambda e: {"noise": {**e.noise.model_dump(), "mean_param": e.noise.mean_param * 4}}, {},
              "more than this member's secure_epsilon"),
    "noise shares": (lambda e: {"noise": {**e.noise.model_dump(), "shares_for": 5}, "min_survivors": 5}, {},
                     "complete only with 5 members' shares"),
    "delta": (lambda e: {"delta": 1e-3}, {}, "exceeds this member's secure_delta"),
    "sensitivity": (lambda e: {"noise": {**e.noise.model_dump(), "mean_sensitivity": 1}}, {},
                    "less than the 100 its unit needs"),
    "reveal rounds": (lambda e: {"reveal_rounds": 20}, {}, "keeps rounds open 20 rounds"),
    "deadline": (lambda e: {"deadline_s": 20.0}, {}, "deadline 20 s is not within"),
    "aggregator": (lambda e: {"aggregator": "other@example.org"}, {}, "not from the aggregator"),
    "not listed": (lambda e: {"cohort": e.cohort[1:], "degree": 3, "threshold": 2, "min_survivors": 4}, {},
                   "not in epoch"),
}


@pytest.mark.parametrize("weakened", list(WEAKENED))
def test_each_weakened_parameter_is_refused_by_the_member(tmp_path, monkeypatch, caplog, weakened):
    """A correctly signed epoch whose one protecting parameter is weaker than the member's own minimum: the member
    takes no part (no upload), and says which parameter."""
    change, member_settings, words = WEAKENED[weakened]
    net = Net(tmp_path, 5, monkeypatch, aggregator_class=LyingAggregator, member_settings=member_settings)
    adv = Adversary(net)
    e = net.agg.epoch
    m = net.members[0]
    raw = {**e.model_dump(), "epoch": e.epoch + 1, **change(e)}
    try:
        weak = Epoch.model_validate(raw)
        adv.write_epoch(weak)
    except ValueError:  # the schema itself refuses it: written as the aggregator would have to
        net.agg.paths.epoch_file().write_bytes(_signed_raw(net, raw))
    with caplog.at_level(logging.WARNING):
        net.members_upload(who={m})
    assert not net.secure[m].paths.upload_file(net.round).exists()
    assert any(words in x.getMessage() for x in caplog.records), [x.getMessage() for x in caplog.records]


def _signed_raw(net: Net, doc: dict) -> bytes:
    """An epoch the schema refuses, signed as the aggregator would sign it."""
    body = json.dumps(doc, default=str, separators=(",", ":")).encode()
    sig = net.agg._me.sign(message(doc["kind"], body))
    return body[:-1] + b',"signature":"' + base64.b64encode(sig) + b'"}'


def test_withheld_signatures(tmp_path, monkeypatch):
    """The aggregator forwards only t - 1 of the victim's neighbours' views (it needs the victim's reveal and cannot
    forge a view): the victim reveals nothing."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, 40)
    r, nbrs, th = net.round, neighbours(net, victim), net.agg.epoch.threshold
    net.agg.withheld[r] = {victim: set(nbrs[th - 1:])}
    play(net)
    assert r in net.secure[victim]._state.views and r not in net.secure[victim]._state.answered
    assert recovered(net, adv, r) == {}


def test_a_substituted_key(tmp_path, monkeypatch, caplog):
    """After the keys are pinned, the relay (or the aggregator) replaces a neighbour's did.json with keys it holds, and
    the aggregator's own: the members refuse both and keep the pinned keys, so the substituted neighbour is no Sybil
    and an epoch signed with the substituted aggregator key is refused."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, 5)
    j = neighbours(net, victim)[0]
    fake = identity.Identity.generate(j)
    net.secure[j].paths.did_file().write_text(json.dumps(fake.did_document()))
    r = net.round
    with caplog.at_level(logging.WARNING):
        play(net, answer=set(net.members) - {j})
    assert any(f"the identity key of {j} changed" in x.getMessage() for x in caplog.records)
    adv.sybils = {j: fake}  # the adversary holds the substituted keys, and tries with them
    tried = adv.opened(r)
    assert not any(v == sent(net, m, r) for m, v in tried.items())
    fake_agg = identity.Identity.generate(AGG)
    net.agg.paths.did_file().write_text(json.dumps(fake_agg.did_document()))
    e = net.agg.epoch
    net.agg.paths.epoch_file().write_bytes(
        signed_file(Epoch.model_validate({**e.model_dump(), "epoch": e.epoch + 1}), fake_agg.sign))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        net.members_upload(who={victim})
    assert any("signature does not verify" in x.getMessage() for x in caplog.records)


def test_a_forged_inbox_from_the_relay(tmp_path, monkeypatch, caplog):
    """The relay stores every file and can write any of them, but holds no key: an inbox it forges (the lie to both,
    with a MAC under a key of its own, or none) is refused; so is an epoch signed by another key."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, 5)
    r, nbrs, th = net.round, neighbours(net, victim), net.agg.epoch.threshold
    net.members_upload()
    net.aggregator_closes()
    lie = entry_for(net.agg.rounds[r], victim, told_dropped=set(nbrs[:th]))
    inbox_path = net.agg.paths.inbox_file(victim)
    honest = inbox_path.read_bytes()
    for forged in (mac_file(Inbox(member=victim, created_at=utc_now(), rounds=[lie]), secrets.token_bytes(32)),
                   Inbox(member=victim, created_at=utc_now(), rounds=[lie]).model_dump_json().encode()):
        inbox_path.write_bytes(forged)
        with caplog.at_level(logging.WARNING):
            net.secure[victim].answer()
        assert r not in net.secure[victim]._state.views
    assert any("is refused" in x.getMessage() and "inbox" in x.getMessage() for x in caplog.records)
    inbox_path.write_bytes(honest)
    net.members_answer()
    net.agg.tick(t((net.round + 1) * net.round_s + net.deadline + 1.0))
    net.round += 1
    play(net, 2)
    assert net.status(r).status == "published" and recovered(net, adv, r) == {}
    relay = identity.Identity.generate(AGG)
    e = net.agg.epoch
    net.agg.paths.epoch_file().write_bytes(signed_file(Epoch.model_validate({**e.model_dump(), "epoch": e.epoch + 1}),
                                                       relay.sign))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        net.members_upload(who={victim})
    assert any("signature does not verify" in x.getMessage() for x in caplog.records)


def test_an_equivocated_epoch(tmp_path, monkeypatch, caplog):
    """The aggregator shows the victim one epoch and the others another under the same number (another ring seed). The
    victim uploads under the one it saw: its round keys and sealed shares are bound to that epoch's hash, so its upload
    counts nowhere, and it answers nothing about the round under the other hash. When the other content reaches it,
    it says it saw an equivocation and stays out until a new epoch."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, 5)
    e, r = net.agg.epoch, net.round
    mine = Epoch.model_validate({**e.model_dump(), "epoch": e.epoch + 1, "first_round": r,
                                 "graph_seed": b64(secrets.token_bytes(32))})
    theirs = Epoch.model_validate({**mine.model_dump(), "graph_seed": b64(secrets.token_bytes(32))})
    adv.write_epoch(mine)
    net.members_upload(who={victim})
    h_mine = b64_bytes(net.upload(victim, r).epoch_hash)
    adv.write_epoch(theirs)
    raw = net.agg.paths.epoch_file().read_bytes()
    net.agg.epoch, net.agg.epoch_h = theirs, epoch_hash(message(theirs.kind, raw[:raw.rindex(b',"signature"')] + b"}"))
    net.members_upload(who=set(net.members) - {victim})
    net.aggregator_closes()
    with caplog.at_level(logging.WARNING):
        net.members_answer()
    net.round += 1
    play(net)
    assert any("equivocation seen" in x.getMessage() for x in caplog.records)
    assert h_mine != net.agg.epoch_h and r not in net.secure[victim]._state.answered
    assert recovered(net, adv, r) == {} and recovered(net, adv, r, h_mine) == {}


def test_an_old_round_asked_again(tmp_path, monkeypatch, caplog):
    """A round the victim answered is asked again with the lie (its neighbours now "dropped", to get the round keys):
    never both for one (round, peer) and one view per round, so nothing new leaves; and once the round is older than
    the answer window, the victim answers nothing about it at all."""
    net, adv, victim = lying_net(tmp_path, monkeypatch, 5)
    r = net.round
    play(net)
    assert net.status(r).status == "published" and r in net.secure[victim]._state.answered
    revealed = set(adv.reveals(r, net.agg.rounds[r].h, net.agg.epoch.degree).get(victim) or [])
    assert revealed  # its shares for its neighbours: the adversary kept them
    rnd = net.agg.rounds[r]
    replayed = rnd.__class__(**{**rnd.__dict__, "views": {}})
    adv.write_inbox(victim, [entry_for(replayed, victim, told_dropped=set(neighbours(net, victim)))])
    net.secure[victim].answer()
    again = adv.reveals(r, rnd.h, net.agg.epoch.degree).get(victim)
    assert again is None or set(again) <= revealed  # at most its same view again: no new reveal
    for _ in range(msec.REVEAL_HORIZON + 1):
        play(net, 1)
    assert r not in net.secure[victim]._state.answered  # forgotten only once it can never be answered again
    with caplog.at_level(logging.WARNING):
        adv.write_inbox(victim, [entry_for(replayed, victim, told_dropped=set(neighbours(net, victim)))])
        net.secure[victim].answer()
    answers = read_mac(net.secure[victim].paths.answers_file().read_bytes(), SecureAnswers,
                       net.secure[victim]._keys["answers"])
    assert not any(x.round == r for x in answers.reveals)
    assert recovered(net, adv, r) == {}


@pytest.mark.parametrize("sybils", [3, 2])
def test_t_sybil_neighbours_open_a_member_and_t_minus_one_do_not(tmp_path, monkeypatch, sybils):
    """The documented condition, shown exact: in a cohort of 5 (4 neighbours each, t = 3), an aggregator that runs 3
    of the victim's neighbours as Sybils tells it that the honest one dropped and signs 3 consistent views with the
    Sybils' keys: the victim reveals the round key with the honest neighbour, the Sybils hold 3 shares of its seed and
    their own round keys, and its value is recovered exactly. With 2 Sybils, the best lie (also telling an honest
    neighbour that the other honest one dropped) leaves one round key nobody reveals: nothing is recovered."""
    net = Net(tmp_path, 5, monkeypatch, aggregator_class=LyingAggregator)
    net.step()
    victim = net.members[0]
    nbrs = neighbours(net, victim)
    bad, honest = nbrs[:sybils], nbrs[sybils:]
    adv = Adversary(net, sybils=bad)
    r = net.round
    survivors = len(net.members)
    told = {honest[0]}
    lies = {victim: told}
    if len(honest) > 1:
        lies[honest[1]] = told  # the consistent honest signer the adversary needs as its third
    net.agg.lies[r] = lies
    net.agg.forged[r] = {s: adv.sybil_view(r, s, {p: p not in told for p in net.members}, survivors) for s in bad}
    play(net, answer=set(net.members) - set(bad))
    got = recovered(net, adv, r)
    if sybils >= net.agg.epoch.threshold:
        assert victim in got and got[victim] == sent(net, victim, r)
    else:
        assert got == {}
