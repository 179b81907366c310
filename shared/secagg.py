"""Secure aggregation, the pure steps: keys, masks, seed shares, the neighbour graph, and unmasking.

The protocol (Bonawitz et al., CCS 2017, with SecAgg+'s sparse neighbour graph, Bell et al., CCS 2020) run over
SyftBox files, one round per UTC window; files and their order live in the two roles' ``secure`` modules.
Member i in round r uploads, readable by the aggregator only,

    y_i = x_i + e_i + PRG(b_i,r) + sum_{j in N(i), j > i} PRG(k_ij,r) - sum_{j in N(i), j < i} PRG(k_ij,r)   (mod 2^64)

where x_i is its quantized window vector, e_i its integer noise share, b_i,r a fresh 16-byte self-mask seed
whose Shamir shares (threshold t) go, sealed for each neighbour j, into the same upload, and k_ij,r a round
key derived from the X25519 secret that i and j share. Over the survivors S the pairwise masks cancel; the
aggregator removes each survivor's self mask (its seed rebuilt from t neighbours' shares) and, for each dropped
j, the masks its surviving neighbours held with j (their round keys k_ij,r, revealed by those neighbours).
For one peer and one round a member reveals the self-mask share or the round key, never both, so an aggregator
that lies about who dropped cannot strip both masks off anyone's upload.

Every primitive comes from a well-kept library: X25519, HKDF-SHA256, AES-256-CTR (the mask stream) and
AES-256-GCM (sealed shares) from ``cryptography``; Shamir over GF(2^127 - 1) with python-flint's field arithmetic
(``shared.shamir``); randomness
from ``secrets`` (the OS's cryptographic source). Nothing here uses numpy's generators.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from typing import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared import shamir

MODULUS_BITS = 64  # arithmetic mod 2^64: numpy's uint64 wraps exactly there
SEED_BYTES = shamir.SECRET_BYTES  # a self-mask seed: one field element of shared.shamir
KEY_BYTES = 32
_PROTOCOL = b"cpu_tracker secagg v1"


# ---------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------
def new_private_key() -> bytes:
    """A fresh X25519 private key, raw 32 bytes (kept outside ``datasites/``, mode 0600, by the caller)."""
    from cryptography.hazmat.primitives import serialization as s

    return X25519PrivateKey.generate().private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())


def public_key(private_raw: bytes) -> bytes:
    """The raw 32-byte X25519 public key of ``private_raw``."""
    from cryptography.hazmat.primitives import serialization as s

    key = X25519PrivateKey.from_private_bytes(private_raw).public_key()
    return key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def fingerprint(public_raw: bytes) -> str:
    """A short public name for a key (SHA-256, 16 hex digits): logs and status show it, never the key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _hkdf(secret: bytes, info: bytes, salt: bytes | None = None, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=_PROTOCOL + b"|" + info).derive(secret)


def pair_secret(private_raw: bytes, peer_public_raw: bytes, *, me: str, peer: str, epoch_salt: bytes) -> bytes:
    """The secret member ``me`` shares with ``peer`` for one epoch: HKDF-SHA256 of their X25519 shared key, salted
    with the epoch's public salt and bound to both emails (in sorted order, so both ends derive the same)."""
    try:  # cryptography refuses a low-order public key (an all-zero shared key)
        shared = X25519PrivateKey.from_private_bytes(private_raw).exchange(
            X25519PublicKey.from_public_bytes(peer_public_raw))
    except ValueError:
        raise ValueError(f"the public key of {peer} is not a usable X25519 key") from None
    a, b = sorted((me, peer))
    return _hkdf(shared, b"pair|" + a.encode() + b"|" + b.encode(), salt=epoch_salt)


def round_key(pair: bytes, round_: int) -> bytes:
    """The pairwise mask key of one round: revealing it uncovers that round's pairwise mask and nothing else."""
    return _hkdf(pair, b"mask|%d" % round_)


def seal_key(pair: bytes) -> bytes:
    """The AES-GCM key that seals self-mask shares from one member of the pair to the other."""
    return _hkdf(pair, b"seal")


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------
def prg(key: bytes, dim: int) -> np.ndarray:
    """``dim`` pseudorandom uint64 words: the AES-256-CTR keystream of ``key`` (each key is used for one
    stream only, so the zero nonce is safe). A 16-byte self-mask seed is stretched to an AES key by HKDF."""
    if len(key) == SEED_BYTES:
        key = _hkdf(key, b"self")
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * dim)) + enc.finalize(), dtype="<u8").astype(np.uint64)


def pair_sign(me: str, peer: str) -> int:
    """+1 when ``me`` adds the pairwise mask it shares with ``peer`` (peer sorts after me), -1 when it subtracts."""
    if me == peer:
        raise ValueError("a member has no pairwise mask with itself")
    return 1 if peer > me else -1


def masked(values: Sequence[int], *, self_seed: bytes, round_keys: Mapping[str, bytes], me: str) -> np.ndarray:
    """``values`` (integers, noise included) plus the self mask and the signed pairwise masks, mod 2^64."""
    dim = len(values)
    y = np.array([int(v) % (1 << MODULUS_BITS) for v in values], dtype=np.uint64)
    y += prg(self_seed, dim)
    for peer, key in round_keys.items():
        if pair_sign(me, peer) > 0:
            y += prg(key, dim)
        else:
            y -= prg(key, dim)
    return y


def unmask_sum(
    uploads: Mapping[str, np.ndarray],
    self_seeds: Mapping[str, bytes],
    dropped_keys: Iterable[tuple[str, str, bytes]],
) -> np.ndarray:
    """The sum over the survivors (the keys of ``uploads``) of their masked vectors, with every self mask and
    every pairwise mask with a dropped member removed, as signed integers (int64, centred mod 2^64).

    ``self_seeds``: each survivor's rebuilt self-mask seed. ``dropped_keys``: (survivor, dropped, k) for every
    surviving neighbour of every dropped member: the round key the survivor revealed."""
    if set(self_seeds) != set(uploads):
        raise ValueError("a self-mask seed is needed for every survivor, and only for them")
    dim = len(next(iter(uploads.values())))
    total = np.zeros(dim, dtype=np.uint64)
    for who, y in uploads.items():
        total += y
        total -= prg(self_seeds[who], dim)
    for survivor, gone, key in dropped_keys:
        if survivor not in uploads or gone in uploads:
            raise ValueError(f"a revealed round key must belong to a survivor ({survivor}) and a dropped member ({gone})")
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
# Self-mask seeds: Shamir shares, sealed for each neighbour
# ---------------------------------------------------------------------------------------------------
def new_seed() -> bytes:
    return shamir.to_bytes(shamir.new_secret())


def split_seed(seed: bytes, holders: Sequence[str], threshold: int) -> dict[str, tuple[int, bytes]]:
    """Shamir shares of ``seed``, one per holder (share index = position in ``holders`` + 1): any ``threshold``
    rebuild it, fewer tell nothing (``shared.shamir``, GF(2^127 - 1))."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold must be between 1 and {len(holders)}, got {threshold}")
    values = shamir.split(shamir.from_bytes(seed), len(holders), threshold)
    return {h: (i + 1, shamir.to_bytes(v)) for i, (h, v) in enumerate(zip(holders, values))}


def combine_seeds(share_sets: Sequence[Sequence[tuple[int, bytes]]], threshold: int) -> list[bytes]:
    """Many seeds at once, each from at least ``threshold`` of its shares (those with the smallest indices are used):
    one Lagrange pass per set of indices (``shared.shamir.combine``). ValueError for a seed with too few shares, a
    repeated index or a share that is not a field element."""
    sets = []
    for shares in share_sets:
        by_index = {index: shamir.from_bytes(value) for index, value in shares}
        if len(by_index) != len(shares):
            raise ValueError("a seed's shares repeat an index")
        sets.append(by_index)
    return [shamir.to_bytes(v) for v in shamir.combine(sets, threshold)]


def seal(key: bytes, plaintext: bytes, aad: bytes) -> str:
    """AES-256-GCM, a random 12-byte nonce in front; base64 text."""
    nonce = secrets.token_bytes(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, plaintext, aad)).decode()


def unseal(key: bytes, text: str, aad: bytes) -> bytes:
    """The plaintext of ``seal``; ``cryptography.exceptions.InvalidTag`` if it was altered or is bound to other
    ``aad`` (another round, sender or receiver)."""
    raw = base64.b64decode(text, validate=True)
    return AESGCM(key).decrypt(raw[:12], raw[12:], aad)


def share_aad(epoch: int, round_: int, sender: str, receiver: str) -> bytes:
    """What a sealed share is bound to: replaying it in another round or for another pair fails."""
    return b"share|%d|%d|" % (epoch, round_) + sender.encode() + b"|" + receiver.encode()


def pack_share(share: tuple[int, bytes]) -> bytes:
    index, value = share
    return index.to_bytes(2, "big") + value


def unpack_share(raw: bytes) -> tuple[int, bytes]:
    if len(raw) != 2 + SEED_BYTES:
        raise ValueError("a seed share is 18 bytes")
    return int.from_bytes(raw[:2], "big"), raw[2:]


# ---------------------------------------------------------------------------------------------------
# The neighbour graph and the thresholds
# ---------------------------------------------------------------------------------------------------
def graph_degree(n: int, complete_up_to: int = 30) -> int:
    """Neighbours per member: everyone else up to ``complete_up_to`` members, else SecAgg+'s logarithmic degree,
    2 * ceil(log2 n) (an even number, so the ring below is symmetric)."""
    if n <= complete_up_to:
        return n - 1
    return min(n - 1, 2 * (n - 1).bit_length())


def neighbour_graph(cohort: Sequence[str], degree: int) -> dict[str, list[str]]:
    """Each member's neighbours: the complete graph when ``degree >= n - 1``, else a ring over a random
    permutation of the cohort (cryptographic shuffle), each member joined to the ``degree / 2`` nearest on
    each side: symmetric, every member exactly ``degree`` neighbours, lists sorted."""
    members = sorted(set(cohort))
    n = len(members)
    if degree >= n - 1:
        return {m: [p for p in members if p != m] for m in members}
    if degree < 2 or degree % 2:
        raise ValueError(f"a ring needs an even degree of at least 2, got {degree}")
    order = list(members)
    secrets.SystemRandom().shuffle(order)
    out: dict[str, set[str]] = {m: set() for m in members}
    for pos, m in enumerate(order):
        for step in range(1, degree // 2 + 1):
            peer = order[(pos + step) % n]
            out[m].add(peer)
            out[peer].add(m)
    return {m: sorted(p) for m, p in out.items()}


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
    |Q| >= n (h + 1) / (2h), and no closed set is smaller in an exhaustive search of every ring up to 22 members and
    an exact integer program on larger ones (``tests/test_secagg.py``); this is that bound, rounded up. Noise sized for
    this many shares keeps a member's epsilon against such an aggregator."""
    if n < 2 or not 1 <= degree <= n - 1:
        raise ValueError(f"need 2 <= n and 1 <= degree <= n - 1, got n={n}, degree={degree}")
    t = shamir_threshold(degree)
    if degree >= n - 1:
        return min(n, t + 1)
    h = degree // 2
    return min(n, max(t + 1, math.ceil(n * (h + 1) / (2 * h) - 1e-9)))


def is_symmetric(graph: Mapping[str, Sequence[str]]) -> bool:
    return all(m != p and m in graph.get(p, ()) for m, peers in graph.items() for p in peers)
