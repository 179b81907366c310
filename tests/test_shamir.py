"""Shamir over GF(2^127 - 1) (shared.secure.shamir): the vectorised rebuild against the secrets and against FLINT's own
linear algebra, on random share sets and dropout patterns."""

from __future__ import annotations

import random

import flint
import pytest

from shared.secure import shamir


def _reference(shares: dict[int, int], threshold: int) -> int:
    """The secret from the first ``threshold`` shares by solving the Vandermonde system for every coefficient of the
    polynomial with FLINT's own solver (no Lagrange formula of ours)."""
    xs = sorted(shares)[:threshold]
    ctx = flint.fmpz_mod_ctx(shamir.PRIME)
    vandermonde = flint.fmpz_mod_mat([[pow(x, k, shamir.PRIME) for k in range(threshold)] for x in xs], ctx)
    values = flint.fmpz_mod_mat([[shares[x]] for x in xs], ctx)
    return int(vandermonde.solve(values)[0, 0])


@pytest.mark.parametrize("n, threshold, dropout", [(2, 2, 0.0), (4, 3, 0.0), (14, 8, 0.1), (20, 11, 0.3),
                                                   (28, 15, 0.0), (28, 15, 0.2), (40, 21, 0.45)])
def test_the_vectorised_rebuild_equals_the_secrets_and_flints_own_solve(n, threshold, dropout):
    rng = random.Random(n * 1000 + threshold)
    secrets_ = [shamir.new_secret() for _ in range(60)] + [0, 1, shamir.PRIME - 1]
    share_sets = []
    for s in secrets_:
        shares = dict(enumerate(shamir.split(s, n, threshold), start=1))
        kept = [x for x in shares if rng.random() >= dropout]
        if len(kept) < threshold:  # this dealer lost too many holders: keep a random threshold of them
            kept = rng.sample(sorted(shares), threshold)
        rng.shuffle(kept)
        share_sets.append({x: shares[x] for x in kept})
    rebuilt = shamir.combine(share_sets, threshold)
    assert rebuilt == secrets_
    assert rebuilt == [_reference(s, threshold) for s in share_sets]


def test_any_threshold_subset_gives_the_same_secret_and_fewer_is_refused():
    secret = shamir.new_secret()
    shares = dict(enumerate(shamir.split(secret, 9, 5), start=1))
    rng = random.Random(7)
    subsets = [dict(rng.sample(sorted(shares.items()), 5)) for _ in range(20)]
    assert shamir.combine(subsets, 5) == [secret] * 20
    with pytest.raises(ValueError, match="fewer than the threshold"):
        shamir.combine([dict(list(shares.items())[:4])], 5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        shamir.split(shamir.PRIME, 3, 2)
    with pytest.raises(ValueError):
        shamir.split(5, 3, 4)
    with pytest.raises(ValueError):
        shamir.lagrange_at_zero([1, 1, 2])
    with pytest.raises(ValueError):
        shamir.from_bytes(b"\xff" * 16)
    assert shamir.from_bytes(shamir.to_bytes(123)) == 123
