"""The pure steps of secure aggregation (shared.secure.secagg): key derivation, masks, shares, the derived graph, views,
packed reveals, the consistency rule and unmasking; and the signed-file envelope of shared.wire.secure_schema."""

from __future__ import annotations

import random
import secrets

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from shared.secure import secagg
from shared.secure.identity import Identity, verify
from tests.adversary import reveal_entries

H = b"h" * 32  # an epoch hash


def _members(n):
    return [f"m{i:03d}@example.org" for i in range(n)]


def _ids(members):
    return {m: Identity.generate(m) for m in members}


def _setup(n, degree=None, seed=b"s" * 32):
    members = _members(n)
    ids = _ids(members)
    graph = secagg.derived_graph(members, seed, secagg.graph_degree(n) if degree is None else degree)
    pairs = {(a, b): secagg.pair_secret(ids[a].prekey_private, ids[a].public.prekey, ids[b].public.prekey, me=a, peer=b,
                                        aggregator="agg@example.org")
             for a in members for b in graph[a]}
    return members, graph, pairs


def _upload(me, values, graph, pairs, round_, seed=None):
    seed = secagg.new_seed() if seed is None else seed
    keys = {p: secagg.round_key(pairs[(me, p)], H, round_) for p in graph[me]}
    return seed, secagg.masked(values, self_seed=seed, round_keys=keys, me=me)


def test_both_ends_derive_the_same_pair_secret_bound_to_keys_and_aggregator():
    a, b = Identity.generate("a@x.org"), Identity.generate("b@x.org")
    s1 = secagg.pair_secret(a.prekey_private, a.public.prekey, b.public.prekey, me="a@x.org", peer="b@x.org",
                            aggregator="agg@x.org")
    s2 = secagg.pair_secret(b.prekey_private, b.public.prekey, a.public.prekey, me="b@x.org", peer="a@x.org",
                            aggregator="agg@x.org")
    assert s1 == s2 and len(s1) == 32
    assert s1 != secagg.pair_secret(a.prekey_private, a.public.prekey, b.public.prekey, me="a@x.org", peer="b@x.org",
                                    aggregator="other@x.org")
    assert secagg.round_key(s1, H, 7) != secagg.round_key(s1, H, 8) != secagg.round_key(s1, b"g" * 32, 8)


def test_member_and_aggregator_derive_the_same_secret():
    m, g = Identity.generate("m@x.org"), Identity.generate("agg@x.org")
    kw = dict(member="m@x.org", member_public=m.public.prekey, aggregator="agg@x.org",
              aggregator_public=g.public.prekey)
    assert secagg.aggregator_secret(m.prekey_private, g.public.prekey, **kw) == \
        secagg.aggregator_secret(g.prekey_private, m.public.prekey, **kw)
    assert secagg.mac_key(b"k" * 32, "upload") != secagg.mac_key(b"k" * 32, "inbox")


def test_a_low_order_public_key_is_refused():
    a = Identity.generate("a@x.org")
    with pytest.raises(ValueError, match="not a usable key"):
        secagg.pair_secret(a.prekey_private, a.public.prekey, bytes(32), me="a@x.org", peer="b@x.org",
                           aggregator="agg@x.org")


@pytest.mark.parametrize("n", [3, 5, 40])
def test_the_unmasked_sum_equals_the_sum_of_the_values_exactly(n):
    members, graph, pairs = _setup(n)
    rng = random.Random(n)
    values = {m: [rng.randrange(-10**6, 10**6) for _ in range(21)] for m in members}
    seeds, total = [], np.zeros(21, dtype=np.uint64)
    for m in members:
        seed, y = _upload(m, values[m], graph, pairs, 5)
        seeds.append(seed)
        total += y
    assert secagg.unmask_sum(total, seeds, []).tolist() == np.sum([values[m] for m in members], axis=0).tolist()


def test_dropped_members_masks_are_removed_with_the_survivors_round_keys():
    members, graph, pairs = _setup(8)
    values = {m: [i + 1] * 3 for i, m in enumerate(members)}
    gone = members[2:4]
    seeds, total = [], np.zeros(3, dtype=np.uint64)
    for m in members:
        seed, y = _upload(m, values[m], graph, pairs, 3)
        if m not in gone:
            seeds.append(seed)
            total += y
    keys = [(s, d, secagg.round_key(pairs[(s, d)], H, 3)) for d in gone for s in graph[d] if s not in gone]
    expected = np.sum([values[m] for m in members if m not in gone], axis=0).tolist()
    assert secagg.unmask_sum(total, seeds, keys).tolist() == expected
    wrong = [(s, d, secagg.round_key(pairs[(s, d)], H, 4)) for s, d, _ in keys]
    assert secagg.unmask_sum(total, seeds, wrong).tolist() != expected


def test_wrap_around_is_exact_near_the_modulus():
    members, graph, pairs = _setup(4)
    big = (1 << 62) - 1
    values = {m: [big, -big, 0] for m in members[:2]} | {m: [-big, big, 1] for m in members[2:]}
    seeds, total = [], np.zeros(3, dtype=np.uint64)
    for m in members:
        seed, y = _upload(m, values[m], graph, pairs, 1)
        seeds.append(seed)
        total += y
    assert secagg.unmask_sum(total, seeds, []).tolist() == [0, 0, 2]


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
    shares = secagg.split_seed(seed, 9, 5)
    picked = dict(random.Random(1).sample(list(enumerate(shares, start=1)), 5))
    assert secagg.combine_seeds([picked], 5) == [seed]
    four = dict(list(picked.items())[:4])
    with pytest.raises(ValueError, match="fewer than the threshold"):
        secagg.combine_seeds([four], 5)
    assert secagg.combine_seeds([four], 4) != [seed]  # four shares interpolate to something else


def test_the_vectorised_rebuild_equals_one_by_one_on_random_share_sets_and_dropout_patterns():
    """Many seeds at once, each over its own set of surviving holders (random dropouts), equal the same seeds rebuilt
    one at a time: the seam the aggregator rebuilds a round's seeds through."""
    rng = random.Random(7)
    n, t = 28, 15
    seeds = [secagg.new_seed() for _ in range(60)]
    sets = []
    for s in seeds:
        shares = secagg.split_seed(s, n, t)
        alive = rng.sample(range(1, n + 1), rng.randint(t, n))
        sets.append({x: shares[x - 1] for x in alive})
    assert secagg.combine_seeds(sets, t) == seeds
    assert [secagg.combine_seeds([s], t)[0] for s in sets] == seeds


def test_sealed_shares_open_only_under_their_own_key():
    pair = secrets.token_bytes(32)
    share = secagg.new_seed()
    key = secagg.share_key(pair, H, 10, "a@x.org", "b@x.org")
    sealed = secagg.seal_share(key, share)
    assert len(sealed) == secagg.SEALED_SHARE_BYTES and secagg.open_share(key, sealed) == share
    for other in (secagg.share_key(pair, H, 11, "a@x.org", "b@x.org"),
                  secagg.share_key(pair, H, 10, "b@x.org", "a@x.org"),
                  secagg.share_key(pair, b"g" * 32, 10, "a@x.org", "b@x.org")):
        with pytest.raises(InvalidTag):
            secagg.open_share(other, sealed)


@pytest.mark.parametrize("n", [3, 10, 30, 31, 100, 1000])
def test_the_derived_graph_is_symmetric_with_the_stated_degree_and_the_same_for_everyone(n):
    members = _members(n)
    degree = secagg.graph_degree(n)
    seed = secrets.token_bytes(32)
    graph = secagg.derived_graph(members, seed, degree)
    assert _is_symmetric(graph)
    assert {len(p) for p in graph.values()} == {degree}
    if n > 30:
        assert degree == 2 * (n - 1).bit_length() < n - 1
        assert graph != secagg.derived_graph(members, secrets.token_bytes(32), degree)  # the seed orders the ring
    order = secagg.ring_order(list(reversed(members)), seed)
    position = {m: i for i, m in enumerate(order)}
    assert all(secagg.neighbours_in(order, position, m, degree) == graph[m] for m in members[:5])
    assert degree // 2 < secagg.shamir_threshold(degree) <= degree


def test_masks_come_from_shake_128_not_from_numpy(monkeypatch):
    import hashlib

    def refuse(*a, **k):
        raise AssertionError("numpy's generator used")

    monkeypatch.setattr(np.random, "default_rng", refuse)
    monkeypatch.setattr(np.random, "RandomState", refuse)
    key = bytes(range(32))
    stream = hashlib.shake_128(b"cpu_tracker secagg v2|prg|pair|" + key).digest(16)
    assert secagg.prg(key, 2).tobytes() == stream
    assert secagg.seed_stream(5, 2).tobytes() != secagg.prg(secagg.seed_bytes(5), 2).tobytes()  # kinds apart


def test_bitmaps_views_and_reveals_pack_and_unpack():
    bits = [True, False, True] * 9 + [True]
    assert secagg.unpack_bits(secagg.pack_bits(bits), 28) == bits
    with pytest.raises(ValueError):
        secagg.unpack_bits(b"\x01" * 4, 28)  # a padding bit set
    entries = [secagg.new_seed(), None, secrets.token_bytes(32), secagg.new_seed()]
    r, blocks, marks, keys = secagg.unpack_reveal(secagg.pack_reveal(9, entries), 4)
    assert r == 9 and marks == bytes([1, 0, 0, 1]) and keys == {2: entries[2]}
    assert blocks == secagg.seed_bytes(entries[0]) + bytes(32) + secagg.seed_bytes(entries[3])
    assert reveal_entries(secagg.pack_reveal(9, entries), 4) == entries
    views = [None, (5, b"\xa0", b"s" * 64), (4, b"\x40", b"t" * 64)]
    records = [None if v is None else secagg.view_record(*v) for v in views]
    rows = np.frombuffer(b"".join(r or bytes(secagg.view_size(3)) for r in records), dtype=np.uint8).reshape(3, -1)
    assert secagg.unpack_views(secagg.pack_views(np.array([r is not None for r in records]), rows), 3, 3) == views
    with pytest.raises(ValueError):
        secagg.unpack_reveal(secagg.pack_reveal(9, entries) + b"x", 4)


@pytest.mark.parametrize("degree", [1, 4, 8, 9, 28, 30])
def test_a_reveal_reads_back_for_every_pattern_and_every_malformed_one_is_refused(degree):
    """The aggregator's slicing reader against the packer on random mixes of shares, keys and gaps, and against each
    way a member could send a reveal whose bitmaps and bytes disagree."""
    rng = random.Random(degree)
    for _ in range(200):
        entries = [rng.choice([None, "share", "share", "share", "key"]) for _ in range(degree)]
        entries = [secagg.new_seed() if e == "share" else secrets.token_bytes(32) if e == "key" else None
                   for e in entries]
        raw = secagg.pack_reveal(3, entries)
        assert reveal_entries(raw, degree) == entries
        for bad in (raw[:-1], raw + b"x", raw[:-16], raw + bytes(16)):
            with pytest.raises(ValueError):
                secagg.unpack_reveal(bad, degree)
    width = (degree + 7) // 8
    raw = secagg.pack_reveal(3, [None] * degree)
    if 8 * width > degree:  # a padding bit set, in either bitmap
        for at in (8 + width - 1, 8 + 2 * width - 1):
            with pytest.raises(ValueError, match="padding"):
                secagg.unpack_reveal(raw[:at] + bytes([raw[at] | 1]) + raw[at + 1:], degree)
    key_of_absent = bytearray(raw)
    key_of_absent[8 + width] |= 0x80  # the first entry marked a key, but absent
    with pytest.raises(ValueError, match="absent"):
        secagg.unpack_reveal(bytes(key_of_absent) + bytes(32), degree)
    with pytest.raises(ValueError, match="short"):
        secagg.unpack_reveal(raw[:8 + width], degree)


def test_the_consistency_rule():
    """A neighbour's view counts only if it is for the same epoch, round and count, both saw each other survive, and
    they agree on every member both mention."""
    me, a, b, c, d = "v@x.org", "a@x.org", "b@x.org", "c@x.org", "d@x.org"
    nbrs = {me: [a, b, c], a: [b, me, d], b: [a, me, c], c: [b, me, d]}
    mine = secagg.View(H, 3, me, 9, (True, True, False))  # c dropped
    theirs = {
        a: secagg.View(H, 3, a, 9, (True, True, True)),  # agrees (d is not mine)
        b: secagg.View(H, 3, b, 9, (True, True, True)),  # says c survived: disagrees
        c: secagg.View(H, 3, c, 9, (True, True, True)),  # dropped in mine: not counted
    }
    agree, disagree = secagg.consistent_signers(mine, nbrs[me], theirs, nbrs)
    assert agree == [a] and sorted(disagree) == [b, c]
    for other in (secagg.View(b"g" * 32, 3, a, 9, (True, True, True)), secagg.View(H, 4, a, 9, (True, True, True)),
                  secagg.View(H, 3, a, 8, (True, True, True)), secagg.View(H, 3, a, 9, (True, False, True))):
        assert secagg.consistent_signers(mine, nbrs[me], {a: other}, nbrs)[0] == []


def test_a_view_signature_covers_every_field():
    me = Identity.generate("v@x.org")
    view = secagg.View(H, 3, "v@x.org", 9, (True, False))
    sig = me.sign(secagg.view_message(view))
    assert verify(me.public.identity, secagg.view_message(view), sig)
    for other in (view._replace(round=4), view._replace(survivors=8), view._replace(statuses=(True, True)),
                  view._replace(member="w@x.org"), view._replace(epoch_hash=b"g" * 32)):
        assert not verify(me.public.identity, secagg.view_message(other), sig)


def test_signed_and_maced_files_cover_their_bytes():
    """The envelope of shared.wire.secure_schema: the signature or MAC is the last member and covers the bytes before
    it; any change of a byte, a missing or a moved trailer, or another kind's key is refused."""
    from datetime import datetime, timezone

    from shared.wire.secure_schema import Refused, SecureJoin, mac_file, read_mac, read_signed, signed_file

    join = SecureJoin(email="m@x.org", identity="A" * 43 + "=", created_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
    key = secrets.token_bytes(32)
    raw = mac_file(join, key)
    assert read_mac(raw, SecureJoin, key).email == "m@x.org"
    for bad in (raw.replace(b"m@x.org", b"n@x.org"), raw[:-3] + b'A"}', raw.replace(b'"mac"', b'"max"')):
        with pytest.raises(Refused):
            read_mac(bad, SecureJoin, key)
    with pytest.raises(Refused):
        read_mac(raw, SecureJoin, secrets.token_bytes(32))
    me = Identity.generate("agg@x.org")
    signed = signed_file(join, me.sign)
    parsed, message = read_signed(signed, SecureJoin, lambda m, s: verify(me.public.identity, m, s))
    assert parsed == join and message.startswith(b"cpu_tracker secagg v2|cpu_tracker.secure_join|")
    with pytest.raises(Refused):
        read_signed(signed.replace(b"2026", b"2027"), SecureJoin, lambda m, s: verify(me.public.identity, m, s))


def _closed_minimum(n: int, degree: int) -> int:
    """The smallest closed set containing one member of the ring (or complete graph) of ``degree``: every member of it
    has at least ``shamir_threshold(degree)`` neighbours in it. Exhaustive over all 2^(n-1) sets."""
    members = _members(n)
    order = members  # a ring in this order (the derived ring is the same graph up to relabelling)
    position = {m: i for i, m in enumerate(order)}
    graph = {m: secagg.neighbours_in(order, position, m, degree) for m in members}
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


def _is_symmetric(graph) -> bool:
    return all(m != p and m in graph.get(p, ()) for m, peers in graph.items() for p in peers)


@pytest.mark.parametrize("n, dropped", [(5, 0), (40, 0), (300, 0), (40, 2), (300, 7)])
def test_the_aggregators_gathering_of_shares_rebuilds_every_survivors_seed(n, dropped):
    """The aggregator gathers every seed's t shares from the members' reveals in one array pass (the whole reveals)
    and one by one where a holder also revealed round keys (its neighbour dropped): on random dropout patterns every
    survivor's seed rebuilds exactly, and with nobody dropped the shares are exactly those at x = 1..t."""
    from datetime import datetime, timezone

    from cpu_tracker_aggregator.secure import Round, Topology, plan_epoch
    from shared.settings import Settings

    settings = Settings(aggregator="agg@example.org", mode="secure")
    epoch = plan_epoch(1, _members(n), settings, "agg@example.org", 0, datetime(2026, 1, 1, tzinfo=timezone.utc),
                       seed=secrets.token_bytes(32))
    topo = Topology.of(epoch)
    rng = random.Random(n * 100 + dropped)
    gone = set(rng.sample(epoch.cohort, dropped))
    alive = [m for m in epoch.cohort if m not in gone]
    rnd = Round(epoch, H, 7, topo, survivors=alive)
    seeds = {m: secagg.new_seed() for m in alive}
    shares = {m: secagg.split_seed(seeds[m], epoch.degree, epoch.threshold) for m in alive}
    for m in alive:
        rnd.shares[m] = {}
    for j in rng.sample(alive, len(alive)):  # reveals arrive in any order
        entries = [shares[p][topo.slot[j][k]] if p not in gone else secrets.token_bytes(32)
                   for k, p in enumerate(topo.graph[j])]
        rnd.take_reveal(j, secagg.pack_reveal(7, entries))
    got, lacking = rnd.seed_shares()
    assert lacking == 0
    assert secagg.combine_seeds(got, epoch.threshold) == [seeds[m] for m in alive]
    t = epoch.threshold  # each seed's lowest t x's held by a survivor: seeds missing the same holders share coefficients
    assert [sorted(g) for g in got] == [[k + 1 for k, p in enumerate(topo.graph[m]) if p not in gone][:t]
                                        for m in alive]
    if not dropped:
        assert got == [{x: shares[m][x - 1] for x in range(1, t + 1)} for m in alive]


def test_gathered_reveals_take_only_real_shares_and_a_share_that_is_no_field_element_alone_is_skipped():
    """Every reveal is filed as a block per neighbour and gathered in one pass: the blocks of entries that are not shares
    (a round key, a share that never arrived: zeros, which are a field element) are never taken as shares, and a share
    that is not a field element is skipped alone, whether its reveal holds shares only or round keys too (whose keys
    still count), while every survivor's seed still rebuilds from the lowest t x's that hold a real share."""
    from datetime import datetime, timezone

    from cpu_tracker_aggregator.secure import Round, Topology, plan_epoch
    from shared.secure import shamir
    from shared.settings import Settings

    settings = Settings(aggregator="agg@example.org", mode="secure")
    rng = random.Random(61)
    epoch = plan_epoch(1, _members(60), settings, "agg@example.org", 0, datetime(2026, 1, 1, tzinfo=timezone.utc),
                       seed=rng.randbytes(32))
    topo, t = Topology.of(epoch), epoch.threshold
    gone = set(rng.sample(epoch.cohort, 2))
    alive = [m for m in epoch.cohort if m not in gone]
    rnd = Round(epoch, H, 7, topo, survivors=alive)
    seeds = {m: secagg.new_seed() for m in alive}
    shares = {m: secagg.split_seed(seeds[m], epoch.degree, t) for m in alive}
    for m in alive:
        rnd.shares[m] = {}
    rnd.need_keys = {(i, d) for d in gone for i in topo.graph[d] if i not in gone}
    missing = set(rng.sample([(j, p) for j in alive for p in topo.graph[j] if p in alive], 40))  # never arrived
    mixed = next(j for j in alive if any(p in gone for p in topo.graph[j]))  # its reveal holds keys too
    sloppy = next(j for j in alive if not any(p in gone or (j, p) in missing for p in topo.graph[j]))  # all shares
    bad_x = {}  # (holder, dealer) -> the x whose share was not a field element
    for j in alive:
        entries = []
        for k, p in enumerate(topo.graph[j]):
            if p in gone:
                entries.append(secagg.round_key(b"pair" + j.encode() + p.encode(), H, 7)[:32])
            elif (j, p) in missing:
                entries.append(None)
            elif j in (mixed, sloppy) and not any(e is not None and not isinstance(e, bytes) and e >= shamir.PRIME
                                                  for e in entries):
                entries.append(shamir.PRIME)  # 16 bytes, but not a field element
                bad_x[(j, p)] = topo.slot[j][k] + 1
            else:
                entries.append(shares[p][topo.slot[j][k]])
        rnd.take_reveal(j, secagg.pack_reveal(7, entries))
    assert {d for i, d in rnd.keys if i == mixed} == {p for p in topo.graph[mixed] if p in gone}
    assert not any(i == mixed for i, _ in rnd.need_keys) and len(bad_x) == 2
    got, lacking = rnd.seed_shares()
    real = [[k + 1 for k, p in enumerate(topo.graph[m]) if p not in gone and (p, m) not in missing
             and bad_x.get((p, m)) != k + 1] for m in alive]  # x's holding a real, filed share
    assert [sorted(g) for g in got] == [xs[:t] for xs in real]  # the lowest t of them
    assert lacking == sum(len(xs) < t for xs in real) < len(alive) // 10
    enough = [k for k, xs in enumerate(real) if len(xs) >= t]
    assert secagg.combine_seeds([got[k] for k in enough], t) == [seeds[alive[k]] for k in enough]


@pytest.mark.parametrize("reason", ["2 of 12 members uploaded", 'quotes " and \\ and \n and é and \u2028'])
def test_the_fast_inbox_encoder_writes_what_the_model_and_the_committed_schema_accept(reason):
    import json
    from datetime import datetime, timezone

    import jsonschema

    from shared.wire.catalog import SCHEMA_DIR
    from shared.wire.secure_schema import Inbox, InboxRound, b64, inbox_file, inbox_round, read_mac

    key = secrets.token_bytes(32)
    now = datetime(2026, 1, 1, 12, 0, 1, 250000, tzinfo=timezone.utc)
    fields = [{"round": 9, "epoch_hash": b64(H), "status": "unmasking", "survived": True, "survivors": 12,
               "statuses": b"\xf0", "sealed": secrets.token_bytes(128), "views": secrets.token_bytes(77)},
              {"round": 8, "epoch_hash": b64(H), "status": "refused", "survivors": 2, "reason": reason},
              {"round": 7, "epoch_hash": b64(H), "status": "unmasking", "survived": False, "survivors": 0}]
    raw = inbox_file("m@x.org", now, [inbox_round(**f) for f in fields], key)
    parsed = read_mac(raw, Inbox, key)
    as_text = [{k: b64(v) if isinstance(v, bytes) else v for k, v in f.items()} for f in fields]
    assert parsed == Inbox(member="m@x.org", created_at=now, rounds=[InboxRound(**e) for e in as_text],
                           mac=parsed.mac)
    assert parsed.rounds[1].reason == reason and parsed.rounds[2].sealed == ""
    jsonschema.validate(json.loads(raw), json.loads((SCHEMA_DIR / "secure_inbox.schema.json").read_text()))
