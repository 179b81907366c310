"""Shamir secret sharing over the prime field GF(p), p = 2^127 - 1, with python-flint's field arithmetic.

Secure mode shares every member's fresh self-mask seed with its neighbours each round and the aggregator rebuilds one
seed per survivor: 10,000 a round at fleet scale. pycryptodome's ``Shamir.combine`` (GF(2^128) in pure Python) takes
about 10 ms a seed, 100 s a round; here the Lagrange coefficients at 0 are computed once per set of share indices and
applied to every seed shared over that set as an exact integer sum reduced mod p once, which takes a few hundredths
of a second for 10,000 seeds. The field arithmetic (the coefficients, the polynomial's evaluation) is FLINT's
(python-flint); the polynomial's coefficients come from ``secrets`` (the OS's cryptographic source). A 127-bit secret
is a member's seed: the mask generator stretches its 16 bytes with HKDF.

Shares are the polynomial's values at x = 1..n (a holder's position in the dealer's sorted neighbour list, plus one):
any ``threshold`` of them give the secret, fewer tell nothing about it.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from typing import Mapping, Sequence

import flint

PRIME = (1 << 127) - 1
SECRET_BYTES = 16
_FIELD = flint.fmpz_mod_ctx(PRIME)
_POLY = flint.fmpz_mod_poly_ctx(PRIME)


def new_secret() -> int:
    """A uniformly random field element (127 bits), from the OS's cryptographic source."""
    return secrets.randbelow(PRIME)


def to_bytes(secret: int) -> bytes:
    return int(secret).to_bytes(SECRET_BYTES, "big")


def from_bytes(raw: bytes) -> int:
    """A field element from its 16 bytes; ValueError if it is not one."""
    if len(raw) != SECRET_BYTES:
        raise ValueError(f"a field element is {SECRET_BYTES} bytes, got {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise ValueError("not an element of GF(2^127 - 1)")
    return value


def split(secret: int, n: int, threshold: int) -> list[int]:
    """The ``n`` shares of ``secret`` (values at x = 1..n of a random polynomial of degree ``threshold`` - 1 whose
    constant term is the secret)."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must be a field element (0 <= secret < 2^127 - 1)")
    if not 1 <= threshold <= n < PRIME:
        raise ValueError(f"need 1 <= threshold <= n, got threshold={threshold}, n={n}")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    points = [_FIELD(x) for x in range(1, n + 1)]
    return [int(y) for y in _POLY(coefficients).multipoint_evaluate(points)]


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """The coefficients c_j with f(0) = sum_j c_j f(x_j) for every polynomial f of degree < len(xs): c_j = prod over
    m != j of x_m / (x_m - x_j). The x's must be distinct and non-zero."""
    if len(set(xs)) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ValueError(f"share indices must be distinct and non-zero, got {list(xs)}")
    field = [_FIELD(x) for x in xs]
    out = []
    for j, xj in enumerate(field):
        num, den = _FIELD(1), _FIELD(1)
        for m, xm in enumerate(field):
            if m != j:
                num *= xm
                den *= xm - xj
        out.append(int(num / den))
    return out


def combine(share_sets: Sequence[Mapping[int, int]], threshold: int) -> list[int]:
    """Rebuild many secrets at once: ``share_sets[i]`` maps share index x to share value for secret i; each needs at
    least ``threshold`` shares and uses the ``threshold`` with the smallest indices. Secrets shared over the same
    indices share one set of Lagrange coefficients (FLINT's field arithmetic), applied to all of them column by column
    in exact integer arithmetic and reduced mod p once per secret: a round with few dropout patterns computes a
    handful of coefficient sets. ValueError names the first secret with too few shares."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, shares in enumerate(share_sets):
        if len(shares) < threshold:
            raise ValueError(f"secret {i} has {len(shares)} shares, fewer than the threshold {threshold}")
        groups[tuple(sorted(shares)[:threshold])].append(i)
    out = [0] * len(share_sets)
    for xs, members in groups.items():
        # in Python's own integers: loading 150,000 shares into a FLINT matrix took five times this whole sum
        total = [0] * len(members)
        for x, c in zip(xs, lagrange_at_zero(xs)):
            total = [acc + c * share_sets[i][x] for acc, i in zip(total, members)]
        for i, secret in zip(members, total):
            out[i] = secret % PRIME
    return out
