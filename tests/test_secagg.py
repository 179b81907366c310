"""The pure steps of secure aggregation (shared.secagg): keys, masks, shares, graph, unmasking."""

from __future__ import annotations

import random
import secrets

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from shared import secagg


def _members(n):
    return [f"m{i:03d}@example.org" for i in range(n)]


def _keys(members):
    priv = {m: secagg.new_private_key() for m in members}
    return priv, {m: secagg.public_key(k) for m, k in priv.items()}


def _setup(n, degree=None, salt=b"s" * 16):
    members = _members(n)
    priv, pub = _keys(members)
    graph = secagg.neighbour_graph(members, secagg.graph_degree(n) if degree is None else degree)
    pairs = {(a, b): secagg.pair_secret(priv[a], pub[b], me=a, peer=b, epoch_salt=salt)
             for a in members for b in graph[a]}
    return members, graph, pairs


def _upload(me, values, graph, pairs, round_, seed=None):
    seed = seed or secagg.new_seed()
    keys = {p: secagg.round_key(pairs[(me, p)], round_) for p in graph[me]}
    return seed, secagg.masked(values, self_seed=seed, round_keys=keys, me=me)


def test_both_ends_derive_the_same_pair_secret_and_other_salts_differ():
    a, b = "a@x.org", "b@x.org"
    (ka, kb) = secagg.new_private_key(), secagg.new_private_key()
    s1 = secagg.pair_secret(ka, secagg.public_key(kb), me=a, peer=b, epoch_salt=b"1" * 16)
    s2 = secagg.pair_secret(kb, secagg.public_key(ka), me=b, peer=a, epoch_salt=b"1" * 16)
    assert s1 == s2 and len(s1) == 32
    assert s1 != secagg.pair_secret(ka, secagg.public_key(kb), me=a, peer=b, epoch_salt=b"2" * 16)
    assert secagg.round_key(s1, 7) != secagg.round_key(s1, 8)


def test_a_low_order_public_key_is_refused():
    with pytest.raises(ValueError, match="not a usable X25519 key"):
        secagg.pair_secret(secagg.new_private_key(), bytes(32), me="a@x.org", peer="b@x.org", epoch_salt=b"0" * 16)


@pytest.mark.parametrize("n", [3, 5, 40])
def test_the_unmasked_sum_equals_the_sum_of_the_values_exactly(n):
    members, graph, pairs = _setup(n)
    rng = random.Random(n)
    values = {m: [rng.randrange(-10**6, 10**6) for _ in range(21)] for m in members}
    seeds, uploads = {}, {}
    for m in members:
        seeds[m], uploads[m] = _upload(m, values[m], graph, pairs, 5)
    total = secagg.unmask_sum(uploads, seeds, [])
    assert total.tolist() == np.sum([values[m] for m in members], axis=0).tolist()


def test_dropped_members_masks_are_removed_with_the_survivors_round_keys():
    members, graph, pairs = _setup(8)
    values = {m: [i + 1] * 3 for i, m in enumerate(members)}
    seeds, uploads = {}, {}
    for m in members:
        seeds[m], uploads[m] = _upload(m, values[m], graph, pairs, 3)
    gone = members[2:4]
    alive = {m: y for m, y in uploads.items() if m not in gone}
    keys = [(s, d, secagg.round_key(pairs[(s, d)], 3)) for d in gone for s in graph[d] if s not in gone]
    total = secagg.unmask_sum(alive, {m: seeds[m] for m in alive}, keys)
    assert total.tolist() == np.sum([values[m] for m in alive], axis=0).tolist()
    wrong_round = [(s, d, secagg.round_key(pairs[(s, d)], 4)) for s, d, _ in keys]
    assert secagg.unmask_sum(alive, {m: seeds[m] for m in alive}, wrong_round).tolist() != total.tolist()


def test_wrap_around_is_exact_near_the_modulus():
    members, graph, pairs = _setup(4)
    big = (1 << 62) - 1
    values = {m: [big, -big, 0] for m in members[:2]} | {m: [-big, big, 1] for m in members[2:]}
    seeds, uploads = {}, {}
    for m in members:
        seeds[m], uploads[m] = _upload(m, values[m], graph, pairs, 1)
    assert secagg.unmask_sum(uploads, seeds, []).tolist() == [0, 0, 2]


def test_one_masked_upload_is_independent_of_the_value():
    """What the aggregator sees of one member (its masked vector) has the same distribution for two very different
    values: each 64-bit word is uniform whatever the input. Over 4000 rounds per input the top byte of the masked
    mean coordinate is tested against uniform (chi-square, 255 degrees of freedom, threshold at p = 1e-6), and the
    two inputs' byte histograms against each other."""
    members, graph, pairs = _setup(3)
    me = members[0]
    hists = []
    for value in (0, 100):
        top = [int(_upload(me, [value, 1, 0], graph, pairs, r)[1][0]) >> 56 for r in range(4000)]
        counts = np.bincount(top, minlength=256)
        hists.append(counts)
        expected = 4000 / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 370.0, chi2  # chi-square 255 dof: P(> 370) ~ 1e-6
    a, b = hists
    pooled = (a + b) / 2
    chi2_two = float((((a - pooled) ** 2 + (b - pooled) ** 2) / np.maximum(pooled, 1)).sum())
    assert chi2_two < 370.0, chi2_two


def test_shamir_rebuilds_with_threshold_shares_and_not_with_fewer():
    seed = secagg.new_seed()
    holders = _members(9)
    shares = secagg.split_seed(seed, holders, 5)
    picked = random.Random(1).sample(list(shares.values()), 5)
    assert secagg.combine_seeds([picked], 5) == [seed]
    with pytest.raises(ValueError):
        secagg.combine_seeds([picked[:4]], 5)
    assert secagg.combine_seeds([picked[:4]], 4) != [seed]  # four shares interpolate to something else


def test_sealed_shares_are_bound_to_round_and_pair():
    key = secrets.token_bytes(32)
    share = secagg.pack_share((3, secagg.new_seed()))
    text = secagg.seal(key, share, secagg.share_aad(1, 10, "a@x.org", "b@x.org"))
    assert secagg.unseal(key, text, secagg.share_aad(1, 10, "a@x.org", "b@x.org")) == share
    for aad in (secagg.share_aad(1, 11, "a@x.org", "b@x.org"), secagg.share_aad(1, 10, "b@x.org", "a@x.org"),
                secagg.share_aad(2, 10, "a@x.org", "b@x.org")):
        with pytest.raises(InvalidTag):
            secagg.unseal(key, text, aad)


@pytest.mark.parametrize("n", [3, 10, 30, 31, 100, 1000])
def test_the_graph_is_symmetric_with_the_stated_degree(n):
    members = _members(n)
    degree = secagg.graph_degree(n)
    graph = secagg.neighbour_graph(members, degree)
    assert secagg.is_symmetric(graph)
    assert {len(p) for p in graph.values()} == {degree}
    if n > 30:
        assert degree == 2 * (n - 1).bit_length() < n - 1
    assert degree // 2 < secagg.shamir_threshold(degree) <= degree


def test_masks_come_from_aes_ctr_not_from_numpy(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("numpy's generator used")

    monkeypatch.setattr(np.random, "default_rng", refuse)
    monkeypatch.setattr(np.random, "RandomState", refuse)
    key = bytes(range(32))
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(16))
    assert secagg.prg(key, 2).tobytes() == stream


def _closed_minimum(n: int, degree: int) -> int:
    """The smallest closed set containing member 0 of the ring (or complete graph) of ``degree``: every member of it
    has at least ``shamir_threshold(degree)`` neighbours in it. Exhaustive over all 2^(n-1) sets."""
    members = _members(n)
    graph = secagg.neighbour_graph(members, degree)
    index = {m: i for i, m in enumerate(members)}
    adj = np.zeros((n, n), dtype=np.int64)
    for m, peers in graph.items():
        adj[index[m], [index[p] for p in peers]] = 1
    t = secagg.shamir_threshold(degree)
    best = n
    masks = np.arange(1 << (n - 1), dtype=np.int64)
    for start in range(0, len(masks), 1 << 16):
        chunk = masks[start:start + (1 << 16)]
        x = np.concatenate([np.ones((len(chunk), 1), dtype=np.int64), (chunk[:, None] >> np.arange(n - 1)) & 1], 1)
        ok = np.all((x == 0) | (x @ adj >= t), axis=1)
        if ok.any():
            best = min(best, int(x[ok].sum(1).min()))
    return best


@pytest.mark.parametrize("n, degree", [(5, 4), (8, 7), (9, 4), (12, 4), (14, 4), (15, 6), (16, 6), (18, 6), (17, 8),
                                       (19, 8)])
def test_no_closed_set_is_smaller_than_the_lying_floor(n, degree):
    """The noise is sized for lying_floor shares: an aggregator that lies about dropouts can unmask no sum over fewer
    honest members (with the consistency rule), checked over every subset of small graphs of both kinds."""
    assert _closed_minimum(n, degree) >= secagg.lying_floor(n, degree)
