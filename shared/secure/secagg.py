"""Secure aggregation, the pure steps (protocol version 2): key derivation, masks, seed shares, the neighbour graph
derived from the epoch's seed, signed views, packed reveals, the consistency rule and unmasking. No I/O.

The protocol (Bonawitz et al., CCS 2017, sections 4 and 6: the malicious-server variant with a consistency round;
with SecAgg+'s sparse neighbour graph, Bell et al., CCS 2020) runs over SyftBox files, one round per release window;
files and their order live in the two roles' ``secure`` modules. Member i in round r of epoch E uploads, readable
by the aggregator only,

    y_i = x_i + e_i + PRG(b_i,r) + sum_{j in N(i), j > i} PRG(k_ij,r) - sum_{j in N(i), j < i} PRG(k_ij,r)   (mod 2^64)

where x_i is its quantized vector, e_i its integer noise share, b_i,r a fresh 127-bit self-mask seed whose Shamir
shares (threshold t) go, sealed for each neighbour j, into the same upload, and k_ij,r = HKDF(pair_ij, h_E, r) a
round key from the X25519 secret i and j share (bound to both emails, both public keys and the aggregator). Over
the survivors S the pairwise masks cancel; the aggregator removes each survivor's self mask (its seed rebuilt from t
neighbours' shares) and, for each dropped j, the masks its surviving neighbours held with j (their round keys).

What stops an aggregator that lies about who dropped (``consistent_signers``): after the round closes each member
signs one view of it (its neighbours' statuses and the survivor count) and reveals anything only once at least t
of its neighbours signed views consistent with its own; it then reveals per its view: a share for a neighbour it
saw survive, the round key for one it saw drop, never both for one (round, peer). For V's t consistent signers, both
V and they believe the other survived, so neither reveals their round key: those masks stay on V's upload unless
the signers' uploads are in the sum too. A sum can only be unmasked over a closed set (each honest member in it has
at least t neighbours in it, or t Sybils among its neighbours), of at least ``lying_floor(n, degree)`` members.

Every primitive comes from a well-kept library: X25519, Ed25519 (views, in ``shared.secure.identity``), HKDF-SHA256 and
AES-256-GCM (sealed shares and reveals) from ``cryptography``; SHAKE-128 (the mask stream) from ``hashlib``; Shamir over
GF(2^127 - 1) with python-flint's field arithmetic (``shared.secure.shamir``); randomness from ``secrets``. Nothing
here uses numpy's generators.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.secure import shamir

MODULUS_BITS = 64  # arithmetic mod 2^64: numpy's uint64 wraps exactly there
SEED_BYTES = shamir.SECRET_BYTES  # a self-mask seed: one element of GF(2^127 - 1)
KEY_BYTES = 32
SEALED_SHARE_BYTES = SEED_BYTES + 16  # AES-GCM: the share and its tag (the key is unique per message: zero nonce)
HASH_BYTES = 32
PROTOCOL = b"cpu_tracker secagg v2"


# ---------------------------------------------------------------------------------------------------
# Key derivation
# ---------------------------------------------------------------------------------------------------
def _lp(part: bytes | str) -> bytes:
    """``part`` with its length in front: concatenations of these cannot be read two ways."""
    raw = part.encode() if isinstance(part, str) else part
    return len(raw).to_bytes(2, "big") + raw


def _hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=PROTOCOL + b"|" + info).derive(secret)


def _exchange(private_raw: bytes, peer_public_raw: bytes, who: str) -> bytes:
    try:  # cryptography refuses a low-order public key (an all-zero shared key)
        return X25519PrivateKey.from_private_bytes(private_raw).exchange(X25519PublicKey.from_public_bytes(
            peer_public_raw))
    except ValueError:
        raise ValueError(f"the X25519 key of {who} is not a usable key") from None


def pair_secret(private_raw: bytes, my_public: bytes, peer_public: bytes, *, me: str, peer: str,
                aggregator: str) -> bytes:
    """The secret member ``me`` shares with neighbour ``peer``: HKDF-SHA256 of their X25519 shared key, bound to both
    emails and both public keys (in sorted order, so both ends derive the same) and to the aggregator's email."""
    shared = _exchange(private_raw, peer_public, peer)
    (a, ka), (b, kb) = sorted(((me, my_public), (peer, peer_public)))
    return _hkdf(shared, b"pair|" + _lp(a) + _lp(ka) + _lp(b) + _lp(kb) + _lp(aggregator))


def aggregator_secret(private_raw: bytes, peer_public: bytes, *, member: str, member_public: bytes,
                      aggregator: str, aggregator_public: bytes) -> bytes:
    """The secret a member shares with its aggregator (either side computes it with its own private key and the other's
    public key): it authenticates the member's uploads and answers and the aggregator's inbox (HMAC), and seals the
    member's reveals so that only the aggregator reads them (not the relay, which stores every file)."""
    shared = _exchange(private_raw, peer_public, member if peer_public == member_public else aggregator)
    return _hkdf(shared, b"aggregator|" + _lp(member) + _lp(member_public) + _lp(aggregator) + _lp(aggregator_public))


def round_key(pair: bytes, epoch_hash: bytes, round_: int) -> bytes:
    """The pairwise mask key of one round of one epoch: revealing it uncovers that mask and nothing else."""
    return _hkdf(pair, b"mask|" + epoch_hash + round_.to_bytes(8, "big"))


def share_key(pair: bytes, epoch_hash: bytes, round_: int, sender: str, receiver: str) -> bytes:
    """The AES-GCM key of the one share ``sender`` seals for ``receiver`` in one round: one key per message (a member
    uploads once per round, recorded before it uploads), so the nonce can be zero."""
    return _hkdf(pair, b"share|" + epoch_hash + round_.to_bytes(8, "big") + _lp(sender) + _lp(receiver))


def mac_key(secret: bytes, purpose: str) -> bytes:
    """An HMAC-SHA256 key from the member-aggregator secret, one per file kind (an upload's key does not authenticate
    an inbox)."""
    return _hkdf(secret, b"mac|" + purpose.encode())


def reveal_key(secret: bytes) -> bytes:
    """The AES-GCM key that seals a member's reveals for the aggregator (random nonces; each reveal is bound to its
    epoch and round by ``reveal_aad``: one derivation per member, not one per round, for the aggregator's 10,000)."""
    return _hkdf(secret, b"reveal")


def reveal_aad(epoch_hash: bytes, round_: int) -> bytes:
    """What a sealed reveal is bound to: opening it under another epoch or round fails."""
    return b"reveal|" + epoch_hash + round_.to_bytes(8, "big")


def fingerprint(public_raw: bytes) -> str:
    """A short public name for a key (SHA-256, 16 hex digits): logs and status show it, never the key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------
def prg(key: bytes, dim: int, kind: bytes = b"pair") -> np.ndarray:
    """``dim`` pseudorandom uint64 words: SHAKE-128 (FIPS 202's extendable-output function, from the standard
    library's OpenSSL) of the key, separated by ``kind``; each key is used for one stream only. A quarter of the cost
    of an AES-CTR stream in Python (no cipher object to build), which the aggregator pays once per survivor a round."""
    return np.frombuffer(hashlib.shake_128(PROTOCOL + b"|prg|" + kind + b"|" + key).digest(8 * dim),
                         dtype="<u8").astype(np.uint64)


def seed_stream(seed: int, dim: int) -> np.ndarray:
    """The self mask of a seed: ``prg`` of its 16 bytes."""
    return prg(seed_bytes(seed), dim, b"self")


def pair_sign(me: str, peer: str) -> int:
    """+1 when ``me`` adds the pairwise mask it shares with ``peer`` (peer sorts after me), -1 when it subtracts."""
    if me == peer:
        raise ValueError("a member has no pairwise mask with itself")
    return 1 if peer > me else -1


def masked(values: Sequence[int], *, self_seed: int, round_keys: Mapping[str, bytes], me: str) -> np.ndarray:
    """``values`` (integers, noise included) plus the self mask and the signed pairwise masks, mod 2^64."""
    dim = len(values)
    y = np.array([int(v) % (1 << MODULUS_BITS) for v in values], dtype=np.uint64)
    y += seed_stream(self_seed, dim)
    for peer, key in round_keys.items():
        if pair_sign(me, peer) > 0:
            y += prg(key, dim)
        else:
            y -= prg(key, dim)
    return y


def unmask_sum(masked_total: np.ndarray, self_seeds: Iterable[int],
               dropped_keys: Iterable[tuple[str, str, bytes]]) -> np.ndarray:
    """The survivors' sum from the sum of their masked vectors (uint64): every survivor's self mask removed (its
    rebuilt seed) and, for each (survivor, dropped, k) in ``dropped_keys``, the mask the survivor held with the
    dropped member. As signed integers (int64, centred mod 2^64)."""
    total = np.array(masked_total, dtype=np.uint64)
    dim = len(total)
    for seed in self_seeds:
        total -= seed_stream(seed, dim)
    for survivor, gone, key in dropped_keys:
        if pair_sign(survivor, gone) > 0:
            total -= prg(key, dim)
        else:
            total += prg(key, dim)
    return total.view(np.int64).copy()


def encode_vector(y: np.ndarray) -> str:
    return base64.b64encode(np.asarray(y, dtype="<u8").tobytes()).decode()


def decode_vector(text: str, dim: int) -> np.ndarray:
    """A masked vector from its base64 text; ValueError unless it holds exactly ``dim`` words."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 8 * dim:
        raise ValueError(f"a masked vector must hold {dim} 64-bit words, got {len(raw)} bytes")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


# ---------------------------------------------------------------------------------------------------
# Self-mask seeds: Shamir shares over GF(2^127 - 1), sealed for each neighbour
# ---------------------------------------------------------------------------------------------------
def new_seed() -> int:
    """A fresh self-mask seed: a uniformly random element of GF(2^127 - 1) from the OS's cryptographic source."""
    return shamir.new_secret()


seed_bytes = shamir.to_bytes  # a seed or share on the wire: 16 bytes, big-endian
seed_value = shamir.from_bytes  # and back (ValueError unless it is a field element)


def split_seed(seed: int, n: int, threshold: int) -> list[int]:
    """The ``n`` Shamir shares of ``seed`` at x = 1..n (x = the holder's position in the dealer's sorted neighbour
    list, plus one): any ``threshold`` rebuild it, fewer tell nothing (``shared.secure.shamir``)."""
    return shamir.split(seed, n, threshold)


def combine_seeds(share_sets: Sequence[Mapping[int, int]], threshold: int) -> list[int]:
    """Many seeds at once, each from at least ``threshold`` of its shares (x -> value), in one vectorised pass per
    set of x's (``shared.secure.shamir.combine``); ValueError for a seed with too few shares."""
    return shamir.combine(share_sets, threshold)


def seal_share(key: bytes, share: int) -> bytes:
    """A share sealed for its holder (``share_key``): 32 bytes, AES-256-GCM with a zero nonce (the key is unique)."""
    return AESGCM(key).encrypt(bytes(12), seed_bytes(share), b"")


def open_share(key: bytes, sealed: bytes) -> int:
    """The share of ``seal_share``; ``cryptography.exceptions.InvalidTag`` if it was altered or sealed under another
    key (another epoch, round, sender or receiver), ValueError if it is not a field element."""
    return seed_value(AESGCM(key).decrypt(bytes(12), sealed, b""))


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM with a random 12-byte nonce in front."""
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    """The plaintext of ``seal``; ``cryptography.exceptions.InvalidTag`` if altered or sealed under another key."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


# ---------------------------------------------------------------------------------------------------
# The neighbour graph, derived from the epoch's seed, and the thresholds
# ---------------------------------------------------------------------------------------------------
def graph_degree(n: int, complete_up_to: int = 30) -> int:
    """Neighbours per member: everyone else up to ``complete_up_to`` members, else SecAgg+'s logarithmic degree,
    2 * ceil(log2 n) (an even number, so the ring below is symmetric)."""
    if n <= complete_up_to:
        return n - 1
    return min(n - 1, 2 * (n - 1).bit_length())


def ring_order(cohort: Sequence[str], seed: bytes) -> list[str]:
    """The cohort ordered around the ring: by SHA-256(seed || email), ties (never seen) by email."""
    return sorted(cohort, key=lambda m: (hashlib.sha256(seed + m.encode()).digest(), m))


def neighbours_in(order: Sequence[str], position: Mapping[str, int], member: str, degree: int) -> list[str]:
    """``member``'s neighbours (sorted): everyone else when ``degree >= n - 1``, else the ``degree / 2`` nearest on
    each side of the ring ``order`` (``position``: member -> index in it)."""
    n = len(order)
    if degree >= n - 1:
        return sorted(m for m in order if m != member)
    if degree < 2 or degree % 2:
        raise ValueError(f"a ring needs an even degree of at least 2, got {degree}")
    at = position[member]
    return sorted({order[(at + step) % n] for s in range(1, degree // 2 + 1) for step in (s, -s)})


def derived_graph(cohort: Sequence[str], seed: bytes, degree: int) -> dict[str, list[str]]:
    """Every member's neighbours: symmetric, every member exactly ``degree`` of them, lists sorted."""
    order = ring_order(cohort, seed)
    position = {m: i for i, m in enumerate(order)}
    return {m: neighbours_in(order, position, m, degree) for m in order}


def shamir_threshold(degree: int) -> int:
    """Shares needed to rebuild a self-mask seed: more than half the neighbours, so that no split of them into
    "told it dropped" and "told it survived" gives an aggregator both all round keys and enough shares."""
    return degree // 2 + 1


def lying_floor(n: int, degree: int) -> int:
    """The fewest honest members whose sum an aggregator that lies about dropouts can unmask in one round, when each
    member reveals only after ``shamir_threshold(degree)`` of its neighbours signed a view consistent with its own
    (no Sybils among them). Such a set Q is closed: each of its members has at least t = degree // 2 + 1 neighbours
    in Q, because a mask between two members whose views agree that both survived is revealed by neither, so both
    uploads must be in the sum. In the complete graph that needs |Q| >= t + 1. In the ring of degree 2h (each member
    joined to the h nearest on each side) the periodic patterns (runs of Q members between gaps of h - 1) need
    |Q| >= n (h + 1) / (2h); this is that bound, rounded up. It is not proven a lower bound: the evidence is an
    exhaustive search of every subset on complete graphs and rings up to 19 members (``tests/test_secagg.py``) and
    exact integer programs (MILP) on rings of 23 to 60 members with degrees 4 to 14, none of which found a smaller
    closed set. Noise sized for this many shares keeps a member's epsilon against such an aggregator."""
    if n < 2 or not 1 <= degree <= n - 1:
        raise ValueError(f"need 2 <= n and 1 <= degree <= n - 1, got n={n}, degree={degree}")
    t = shamir_threshold(degree)
    if degree >= n - 1:
        return min(n, t + 1)
    h = degree // 2
    return min(n, max(t + 1, math.ceil(n * (h + 1) / (2 * h) - 1e-9)))


# ---------------------------------------------------------------------------------------------------
# Bitmaps, views, reveals
# ---------------------------------------------------------------------------------------------------
def pack_bits(bits: Sequence[bool] | np.ndarray) -> bytes:
    """Bits in order, most significant first, padded with zeros to whole bytes."""
    return np.packbits(np.asarray(bits, dtype=bool), bitorder="big").tobytes()


def unpack_bits(raw: bytes, n: int) -> list[bool]:
    """The first ``n`` bits of ``pack_bits``; ValueError if ``raw`` has another length or padding that is not zero."""
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"a bitmap of {n} bits is {(n + 7) // 8} bytes, got {len(raw)}")
    bits = [bool(raw[i // 8] & (0x80 >> (i % 8))) for i in range(8 * len(raw))]
    if any(bits[n:]):
        raise ValueError("a bitmap's padding bits must be zero")
    return bits[:n]


class View(NamedTuple):
    """What one member signs about one round it uploaded in and was told it survived: the epoch (its hash), the
    round, the survivor count and each of its neighbours' statuses (True: survived), in its sorted neighbour order."""

    epoch_hash: bytes
    round: int
    member: str
    survivors: int
    statuses: tuple[bool, ...]

    def status_of(self, neighbours: Sequence[str]) -> dict[str, bool]:
        return dict(zip(neighbours, self.statuses))


def view_message(view: View) -> bytes:
    """The bytes a view's Ed25519 signature covers (``identity.sign``), one layout for signer and checker."""
    return (PROTOCOL + b"|view|" + view.epoch_hash + view.round.to_bytes(8, "big") + view.survivors.to_bytes(4, "big")
            + _lp(view.member) + pack_bits(view.statuses))


def consistent_signers(mine: View, my_neighbours: Sequence[str], theirs: Mapping[str, View],
                       neighbours_of: Mapping[str, Sequence[str]]) -> tuple[list[str], list[str]]:
    """Which neighbours' (already verified) views agree with ``mine``, and which disagree. A view agrees when it is for
    the same epoch, round and survivor count, its signer survived in ``mine``, ``mine``'s member survived in it, and
    both give the same status to every member both mention. ``neighbours_of[j]``: j's sorted neighbours."""
    me = mine.member
    my_status = mine.status_of(my_neighbours)
    agree, disagree = [], []
    for j, view in sorted(theirs.items()):
        if j not in my_status or view.member != j:
            continue
        theirs_status = view.status_of(neighbours_of[j])
        ok = (view.epoch_hash == mine.epoch_hash and view.round == mine.round and view.survivors == mine.survivors
              and my_status[j] and theirs_status.get(me) is True
              and all(theirs_status[m] == s for m, s in my_status.items() if m in theirs_status))
        (agree if ok else disagree).append(j)
    return agree, disagree


def pack_reveal(round_: int, entries: Sequence[int | bytes | None]) -> bytes:
    """A member's reveals of one round, in its neighbour order: a share (an int, 16 bytes) for a neighbour it saw
    survive, a round key (32 bytes) for one it saw drop, None for nothing (a share that did not arrive). Layout:
    round (8 bytes), a bitmap of the present entries, a bitmap of the keys among them, then the entries."""
    present = [e is not None for e in entries]
    is_key = [isinstance(e, (bytes, bytearray)) for e in entries]
    body = b"".join(bytes(e) if isinstance(e, (bytes, bytearray)) else seed_bytes(e) for e in entries if e is not None)
    if any(isinstance(e, (bytes, bytearray)) and len(e) != KEY_BYTES for e in entries):
        raise ValueError(f"a round key is {KEY_BYTES} bytes")
    return round_.to_bytes(8, "big") + pack_bits(present) + pack_bits(is_key) + body


def unpack_reveal(raw: bytes, degree: int) -> tuple[int, bytes, bytes, dict[int, bytes]]:
    """``pack_reveal``'s reveal for a member with ``degree`` neighbours, as the aggregator files it: (round, a block
    of ``SEED_BYTES`` per neighbour in its order, holding the share where the entry is one and zeros elsewhere, a
    byte per neighbour that is 1 where the block is a share, the round keys by neighbour position). Cut with a
    slice per entry that is not a share (a reveal is mostly shares): no object per entry. ValueError if malformed.
    A share's block is not checked to be a field element here (``seed_value`` does, or the caller in bulk)."""
    width = (degree + 7) // 8
    head = 8 + 2 * width
    if len(raw) < head:
        raise ValueError("a reveal is too short")
    present, is_key = int.from_bytes(raw[8:8 + width], "big"), int.from_bytes(raw[8 + width:head], "big")
    pad = 8 * width - degree
    if (present | is_key) & ((1 << pad) - 1):
        raise ValueError("a bitmap's padding bits must be zero")
    if is_key & ~present:
        raise ValueError("a reveal marks an absent entry as a key")
    others = (((1 << degree) - 1) << pad) & ~(present & ~is_key)  # the entries that are not shares
    if len(raw) != head + SEED_BYTES * (degree - others.bit_count()) + KEY_BYTES * is_key.bit_count():
        raise ValueError("a reveal's length does not match its bitmaps")
    round_ = int.from_bytes(raw[:8], "big")
    if not others:
        return round_, raw[head:], b"\1" * degree, {}
    blocks, marks, keys, at, done = [], bytearray(b"\1" * degree), {}, head, 0
    while others:
        top = others.bit_length() - 1
        i = 8 * width - 1 - top  # the next entry that is not a share, in neighbour order
        blocks.append(raw[at:at + SEED_BYTES * (i - done)])
        at += SEED_BYTES * (i - done)
        if is_key >> top & 1:
            keys[i] = raw[at:at + KEY_BYTES]
            at += KEY_BYTES
        blocks.append(bytes(SEED_BYTES))
        marks[i], done, others = 0, i + 1, others ^ (1 << top)
    blocks.append(raw[at:])
    return round_, b"".join(blocks), bytes(marks), keys


def view_size(degree: int) -> int:
    """The bytes of one ``view_record`` whose signer has ``degree`` neighbours."""
    return 4 + (degree + 7) // 8 + 64


def view_record(survivors: int, statuses: bytes, signature: bytes) -> bytes:
    """One signed view as an inbox carries it: the survivor count (4 bytes), the statuses bitmap over its signer's
    neighbours, the Ed25519 signature (64 bytes)."""
    if len(signature) != 64:
        raise ValueError("a view's signature is 64 bytes")
    return survivors.to_bytes(4, "big") + statuses + signature


def pack_views(present: np.ndarray, records: np.ndarray) -> bytes:
    """Neighbours' signed views for one member's inbox, in its neighbour order: ``records`` holds a row per neighbour
    (its ``view_record`` where ``present``, anything elsewhere). Layout: a bitmap of the present entries, then their
    records."""
    if records.ndim != 2 or len(records) != len(present) or records.dtype != np.uint8:
        raise ValueError("the view records must be a row of bytes per neighbour")
    return pack_bits(present) + records[np.asarray(present, dtype=bool)].tobytes()


def unpack_views(raw: bytes, n: int, degree: int) -> list[tuple[int, bytes, bytes] | None]:
    """The ``n`` entries of ``pack_views``; ValueError if malformed."""
    head, width = (n + 7) // 8, (degree + 7) // 8
    present = unpack_bits(raw[:head], n)
    size, at, out = view_size(degree), head, []
    for p in present:
        if not p:
            out.append(None)
            continue
        chunk = raw[at:at + size]
        if len(chunk) != size:
            raise ValueError("the views are cut short")
        out.append((int.from_bytes(chunk[:4], "big"), bytes(chunk[4:4 + width]), bytes(chunk[4 + width:])))
        at += size
    if at != len(raw):
        raise ValueError("the views have trailing bytes")
    return out
