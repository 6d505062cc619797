"""BlockPool: allocation accounting, the prefix-cache hash chain, refcounts and lazy LRU eviction.

Block size 4 throughout; token ids are small ints. A hypothesis state machine at the end drives
random interleavings of allocate / match / register / release and checks the pool's invariants
after every step.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fp4serve.engine.block_pool import BlockPool, block_hash
from fp4serve.errors import ConfigError

BS = 4


def pool(num_blocks: int = 8, prefix_caching: bool = True) -> BlockPool:
    return BlockPool(num_blocks, BS, prefix_caching)


def cache_request(p: BlockPool, tokens: list[int]) -> tuple[list[int], list[int]]:
    """Allocate blocks for `tokens`, mark them all committed and hash the full blocks."""
    blocks = p.allocate(-(-len(tokens) // BS))
    hashes: list[int] = []
    p.register_full_blocks(blocks, hashes, tokens, len(tokens))
    return blocks, hashes


def check_invariants(p: BlockPool) -> None:
    free = set(p.free)
    referenced = {b for b in range(p.num_blocks) if p.ref_count[b] > 0}
    assert len(free) == len(p.free), "a block is on the free list twice"
    assert not free & referenced, f"blocks both free and referenced: {free & referenced}"
    assert len(free) + len(referenced) == p.num_blocks, "a block is neither free nor referenced"
    assert all(r >= 0 for r in p.ref_count)
    for h, b in p.cached.items():
        assert p.hash_of[b] == h, f"cached hash {h} points at block {b}, whose hash is {p.hash_of[b]}"
    for b, h in enumerate(p.hash_of):
        if h is not None:
            assert p.cached.get(h) == b, f"block {b} has hash {h} but the cache does not point at it"


# ---- allocation and accounting ---------------------------------------------------------------


def test_allocate_and_release_accounting():
    p = pool(8)
    assert p.num_free == 8 and p.usage() == 0.0
    a = p.allocate(3)
    b = p.allocate(2)
    assert len(set(a) | set(b)) == 5, "allocation handed out a block twice"
    assert p.num_free == 3
    assert p.usage() == pytest.approx(5 / 8)
    assert all(p.ref_count[x] == 1 for x in a + b)
    p.release(a[::-1])
    assert p.num_free == 6
    assert all(p.ref_count[x] == 0 for x in a)
    p.release(b[::-1])
    assert p.num_free == 8
    check_invariants(p)


def test_allocate_more_than_free_raises_and_changes_nothing():
    p = pool(4)
    p.allocate(3)
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks with 1 free"):
        p.allocate(2)
    assert p.num_free == 1
    check_invariants(p)


def test_empty_pool_is_a_config_error():
    with pytest.raises(ConfigError, match="kv-cache-memory"):
        BlockPool(0, BS, True)


def test_double_release_asserts():
    p = pool(4)
    (b,) = p.allocate(1)
    p.release([b])
    with pytest.raises(AssertionError, match=f"block {b} released twice"):
        p.release([b])


# ---- prefix matching -------------------------------------------------------------------------


def test_match_returns_whole_chain_when_every_block_matches():
    p = pool(8)
    tokens = list(range(12))  # 3 full blocks
    blocks, hashes = cache_request(p, tokens)
    query = tokens + [99]  # one more token, so all three blocks may be matched
    matched, matched_hashes = p.match_prefix(query, len(query) - 1)
    assert matched == blocks
    assert matched_hashes == hashes
    assert all(p.ref_count[b] == 2 for b in blocks)


def test_match_stops_at_first_differing_block():
    p = pool(8)
    tokens = list(range(16))  # 4 full blocks
    blocks, hashes = cache_request(p, tokens)
    query = tokens.copy()
    query[9] = 999  # a token of block 2 differs
    query.append(5)
    matched, matched_hashes = p.match_prefix(query, len(query) - 1)
    assert matched == blocks[:2]
    assert matched_hashes == hashes[:2]
    # Block 3 holds the same tokens as the query's block 3, but its chain (parent hash) differs.
    assert p.ref_count[blocks[2]] == 1 and p.ref_count[blocks[3]] == 1


def test_match_differing_first_block_matches_nothing():
    p = pool(8)
    cache_request(p, list(range(8)))
    matched, hashes = p.match_prefix([7] + list(range(1, 9)), 8)
    assert matched == [] and hashes == []


def test_match_never_covers_the_last_token():
    """The scheduler asks for num_tokens - 1, so a prompt of exactly k full blocks matches k - 1:
    the last token must be computed to produce logits."""
    p = pool(8)
    tokens = list(range(8))  # exactly 2 blocks
    blocks, _ = cache_request(p, tokens)
    matched, _ = p.match_prefix(tokens, len(tokens) - 1)
    assert matched == blocks[:1]
    matched_all, _ = p.match_prefix(tokens, len(tokens))
    assert matched_all == blocks, "with max_tokens = len, both blocks fit"
    matched_short, _ = p.match_prefix(tokens, 3)
    assert matched_short == [], "max_tokens below one block matches nothing"


def test_match_with_prefix_caching_disabled_is_empty_and_registers_nothing():
    p = pool(8, prefix_caching=False)
    blocks, hashes = cache_request(p, list(range(8)))
    assert hashes == [] and p.cached == {}
    assert p.match_prefix(list(range(9)), 8) == ([], [])
    assert p.ref_count[blocks[0]] == 1


def test_refcounts_shared_between_two_requests():
    p = pool(8)
    tokens = list(range(8))
    blocks, _ = cache_request(p, tokens)
    shared, _ = p.match_prefix(tokens + [1], 8)
    assert shared == blocks and all(p.ref_count[b] == 2 for b in blocks)
    p.release(blocks[::-1])  # the first request finishes
    assert p.num_free == 6, "blocks still referenced by the second request must not be freed"
    assert all(p.ref_count[b] == 1 for b in blocks)
    p.release(shared[::-1])
    assert p.num_free == 8
    check_invariants(p)


def test_hit_statistics():
    p = pool(8)
    tokens = list(range(8))
    cache_request(p, tokens)
    p.match_prefix(tokens + [1, 2, 3, 4], 11)  # 2 full blocks queried, 2 hit
    assert (p.queries, p.hits) == (2, 2)
    p.match_prefix([50] * 9, 8)  # 2 queried, 0 hit
    assert (p.queries, p.hits) == (4, 2)


# ---- eviction --------------------------------------------------------------------------------


def test_freed_hashed_block_stays_findable_until_reused():
    p = pool(4)
    tokens = list(range(8))
    blocks, hashes = cache_request(p, tokens)
    p.release(blocks[::-1])
    assert p.num_free == 4
    assert p.hash_of[blocks[0]] == hashes[0], "a freed block keeps its hash"
    matched, _ = p.match_prefix(tokens + [1], 8)
    assert matched == blocks, "a freed block is still findable"
    assert p.num_free == 2, "matching a free block takes it off the free list"
    assert all(p.ref_count[b] == 1 for b in blocks)
    check_invariants(p)


def test_allocation_reuses_oldest_freed_first_and_forgets_its_hash():
    p = pool(4)
    a, _ = cache_request(p, [1, 1, 1, 1])
    b, hb = cache_request(p, [2, 2, 2, 2])
    c, hc = cache_request(p, [3, 3, 3, 3])
    p.allocate(1)  # the pool is now full
    p.release(b)  # freed first: oldest
    p.release(a)
    p.release(c)
    (first,) = p.allocate(1)
    assert first == b[0], "allocation must take the least recently freed block"
    assert p.hash_of[first] is None and hb[0] not in p.cached, "a reused block forgets its hash"
    assert p.match_prefix([2, 2, 2, 2, 9], 4) == ([], []), "its old content is no longer findable"
    matched, _ = p.match_prefix([1, 1, 1, 1, 9], 4)
    assert matched == a, "blocks not yet reused stay findable"
    (second,) = p.allocate(1)
    assert second == c[0]
    assert hc[0] not in p.cached
    check_invariants(p)


def test_tail_first_release_evicts_prefix_blocks_last():
    p = pool(3)
    tokens = list(range(12))
    blocks, hashes = cache_request(p, tokens)
    p.release(blocks[::-1])  # what the scheduler does: tail first
    assert p.allocate(1) == [blocks[2]], "the tail block is evicted first"
    assert p.allocate(1) == [blocks[1]]
    assert hashes[2] not in p.cached and hashes[1] not in p.cached
    matched, _ = p.match_prefix(tokens + [0], 12)
    assert matched == blocks[:1], "the first block, evicted last, is still findable"
    check_invariants(p)


def test_tail_first_release_order_in_free_queue():
    p = pool(3)
    blocks, _ = cache_request(p, list(range(12)))
    p.release(blocks[::-1])
    assert list(p.free) == blocks[::-1], "the LRU queue must evict the tail block first, the first block last"


def test_rematch_after_free_moves_block_to_back_of_lru():
    p = pool(3)
    x, _ = cache_request(p, [1, 1, 1, 1])
    y, _ = cache_request(p, [2, 2, 2, 2])
    (z,) = p.allocate(1)
    p.release(x)
    p.release(y)
    p.release([z])
    m, _ = p.match_prefix([1, 1, 1, 1, 0], 4)  # x is reused by a new request, then freed again
    p.release(m)
    assert list(p.free) == [y[0], z, x[0]]


def test_reset_prefix_cache_forgets_every_hash():
    p = pool(4)
    blocks, _ = cache_request(p, list(range(8)))
    p.reset_prefix_cache()
    assert p.cached == {} and all(h is None for h in p.hash_of)
    assert p.match_prefix(list(range(9)), 8) == ([], [])
    assert all(p.ref_count[b] == 1 for b in blocks), "reset touches no refcount"
    check_invariants(p)


# ---- registration ----------------------------------------------------------------------------


def test_register_hashes_only_blocks_full_of_committed_tokens():
    p = pool(8)
    tokens = list(range(11))  # blocks: 4 + 4 + 3
    blocks = p.allocate(3)
    hashes: list[int] = []
    p.register_full_blocks(blocks, hashes, tokens, 3)
    assert hashes == [] and p.cached == {}, "no block is full after 3 committed tokens"
    p.register_full_blocks(blocks, hashes, tokens, 7)
    assert len(hashes) == 1, "only the first block is fully committed at 7 tokens"
    assert hashes[0] == block_hash(None, (0, 1, 2, 3))
    assert p.cached == {hashes[0]: blocks[0]} and p.hash_of[blocks[0]] == hashes[0]
    p.register_full_blocks(blocks, hashes, tokens, 11)
    assert len(hashes) == 2, "the third block has 3 of 4 tokens and must not be hashed"
    assert hashes[1] == block_hash(hashes[0], (4, 5, 6, 7))
    assert p.hash_of[blocks[2]] is None
    check_invariants(p)


def test_register_ignores_uncommitted_tokens_beyond_num_committed():
    """Tokens past num_committed (e.g. draft tokens under verification) must not be hashed even
    when they would fill a block."""
    p = pool(8)
    tokens = list(range(8))
    blocks = p.allocate(2)
    hashes: list[int] = []
    p.register_full_blocks(blocks, hashes, tokens, 6)
    assert len(hashes) == 1 and p.hash_of[blocks[1]] is None


def test_register_is_incremental_and_idempotent():
    p = pool(8)
    tokens = list(range(8))
    blocks = p.allocate(2)
    hashes: list[int] = []
    p.register_full_blocks(blocks, hashes, tokens, 8)
    snapshot = (list(hashes), dict(p.cached))
    p.register_full_blocks(blocks, hashes, tokens, 8)
    assert (hashes, p.cached) == snapshot


def test_duplicate_content_keeps_the_first_cached_block():
    p = pool(8)
    tokens = list(range(8))
    first, h1 = cache_request(p, tokens)
    second, h2 = cache_request(p, tokens)  # computed independently (e.g. admitted before first registered)
    assert h1 == h2, "equal prefixes hash equal"
    assert [p.cached[h] for h in h1] == first, "the first cached block keeps the hash"
    assert all(p.hash_of[b] is None for b in second), "the duplicate is not hashed"
    p.release(second[::-1])
    p.allocate(2)  # reusing the duplicates must not disturb the cache entries of `first`
    assert [p.cached[h] for h in h1] == first
    check_invariants(p)


def test_chain_hash_depends_on_parent():
    assert block_hash(None, (1, 2, 3, 4)) != block_hash(block_hash(None, (0, 0, 0, 0)), (1, 2, 3, 4))


# ---- random interleavings ------------------------------------------------------------------

NUM_BLOCKS = 10
# Few distinct token values, so prompts share prefixes often.
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=6 * BS)


class BlockPoolMachine(RuleBasedStateMachine):
    """Requests as the scheduler drives them: match a prefix, allocate the rest, commit some tokens
    (registering full blocks), release tail first. A model of expected refcounts is kept alongside."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, BS, True)
        self.requests: list[dict] = []  # {"tokens", "blocks", "hashes", "committed"}

    @rule(tokens=token_lists)
    def admit(self, tokens):
        p = self.pool
        blocks, hashes = p.match_prefix(tokens, len(tokens) - 1)
        assert len(blocks) * BS <= len(tokens) - 1
        for i, h in enumerate(hashes):  # a hit really holds the query's tokens
            assert h == block_hash(hashes[i - 1] if i else None, tuple(tokens[i * BS : (i + 1) * BS]))
            assert p.hash_of[blocks[i]] == h
        need = -(-len(tokens) // BS) - len(blocks)
        if need > p.num_free:
            p.release(blocks[::-1])
            return
        blocks = blocks + p.allocate(need)
        assert len(set(blocks)) == len(blocks)
        self.requests.append({"tokens": tokens, "blocks": blocks, "hashes": hashes, "committed": len(hashes) * BS})

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def commit(self, data):
        r = data.draw(st.sampled_from(self.requests))
        r["committed"] = data.draw(st.integers(r["committed"], len(r["tokens"])))
        before = len(r["hashes"])
        self.pool.register_full_blocks(r["blocks"], r["hashes"], r["tokens"], r["committed"])
        assert len(r["hashes"]) == max(before, r["committed"] // BS)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish(self, data):
        r = data.draw(st.sampled_from(self.requests))
        self.requests.remove(r)
        self.pool.release(r["blocks"][::-1])

    @rule(n=st.integers(0, 3))
    def allocate_and_free(self, n):
        """Pressure from outside the modeled requests: forces evictions."""
        if n <= self.pool.num_free:
            self.pool.release(self.pool.allocate(n)[::-1])

    @invariant()
    def pool_is_consistent(self):
        check_invariants(self.pool)

    @invariant()
    def refcounts_match_owners(self):
        expected = [0] * NUM_BLOCKS
        for r in self.requests:
            for b in r["blocks"]:
                expected[b] += 1
        assert self.pool.ref_count == expected


BlockPoolMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockPoolStateMachine = BlockPoolMachine.TestCase


def test_block_hash_is_collision_resistant_and_covers_every_token():
    """BLAKE2b-256 digests, not Python's 64-bit hash(): hash((None, (-1,))) == hash((None, (-2,)))
    (CPython maps -1 to -2), yet the chain keys differ; changing any one token, or the parent,
    changes the key."""
    assert hash((None, (-1,))) == hash((None, (-2,)))
    assert block_hash(None, (-1,)) != block_hash(None, (-2,))
    tokens = (5, 6, 7, 8)
    key = block_hash(None, tokens)
    assert isinstance(key, bytes) and len(key) == 32
    for i in range(len(tokens)):
        changed = tokens[:i] + (tokens[i] + 1,) + tokens[i + 1 :]
        assert block_hash(None, changed) != key, f"token {i} does not reach the key"
    assert block_hash(key, tokens) != block_hash(block_hash(None, (5, 6, 7, 9)), tokens)
