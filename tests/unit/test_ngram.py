"""N-gram prompt lookup against a brute-force search written from the definition."""
from __future__ import annotations

import random

import pytest

from fp4serve.spec_decode.ngram import NgramProposer


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Longest suffix n-gram in [min_n, max_n] with an earlier occurrence; the latest such occurrence."""
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_copies_what_followed_the_match():
    p = NgramProposer(k=3, min_n=2, max_n=4)
    #            0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 1, 2, 6, 7, 8]
    assert p.lookup(tokens) == [9, 1, 2]  # suffix [6, 7, 8] occurred at 1
    assert p.lookup(tokens, k=1) == [9]
    assert p.lookup(tokens, k=0) == []
    assert p.lookup([1, 2, 3, 4]) == []  # no repeat
    assert p.lookup([3, 3]) == []  # shorter than min_n + 1


def test_prefers_the_longest_then_latest_match():
    p = NgramProposer(k=2, min_n=1, max_n=3)
    assert p.lookup([1, 2, 3, 40, 9, 2, 3, 50, 1, 2, 3]) == [40, 9]  # the 3-gram wins over the later 2-gram
    assert p.lookup([2, 3, 40, 7, 2, 3, 50, 7, 3]) == [50, 7]  # only 1-grams: the latest one


@pytest.mark.parametrize("seed", range(30))
def test_random_sequences_match_brute_force(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
    k, low = rng.randrange(1, 6), rng.randrange(1, 4)
    high = low + rng.randrange(0, 4)
    assert NgramProposer(k, low, high).lookup(tokens) == brute_force(tokens, k, low, high)
