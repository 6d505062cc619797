"""KV block pool with prefix caching (a hash chain over token ids), refcounts and lazy LRU eviction.

A full block's hash covers its tokens and, through its parent's hash, every token before it, so
equal hashes mean equal prefixes. A freed block keeps its hash and stays findable until it is
reused: free blocks form one LRU queue; allocation takes the oldest and forgets its hash then.
On hybrid models the pool also owns the GDN snapshot index (snapshot_pool.py): a snapshot is keyed
by the hash of the block that ends at its position, and goes when that block is evicted.
A block holding image tokens also hashes its images' digests (`extra_keys`, per block index): image
placeholders are one repeated token id, whatever the image."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from fp4serve.engine.snapshot_pool import SnapshotPool
from fp4serve.errors import ConfigError


def block_hash(parent: bytes | None, tokens: tuple[int, ...], extra: tuple[str, ...] = ()) -> bytes:
    """BLAKE2b-256 of the parent's digest, the tokens as int64 and any image digests of the block:
    collision resistant, so one prompt can never be served another's cache (Python's 64-bit hash()
    could be made to collide). About 1 us per 16-token block on one CPU core."""
    digest = hashlib.blake2b(parent or b"", digest_size=32)
    digest.update(array("q", tokens).tobytes())
    for key in extra:
        digest.update(b"\0image:" + key.encode())
    return digest.digest()


def _extra(extra_keys: Sequence[tuple[str, ...]], block: int) -> tuple[str, ...]:
    return extra_keys[block] if block < len(extra_keys) else ()


class BlockPool:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool, snapshots: SnapshotPool | None = None
    ):
        if num_blocks < 1:
            raise ConfigError("the KV cache holds no block: raise --kv-cache-memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        # The token after each hashed block in the sequence that filled it (None: not known yet): a
        # drafter whose cache row at a position depends on the next token (MTP) checks it on a hit.
        self.next_token: list[int | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.snapshots = snapshots
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hits = 0
        self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free (scheduler bug)")
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            if self.hash_of[block] is not None:  # evict: its cached content is about to be overwritten
                del self.cached[self.hash_of[block]]
                if self.snapshots is not None:
                    self.snapshots.drop(self.hash_of[block])
                self.hash_of[block] = None
                self.next_token[block] = None
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Callers pass a request's blocks tail first, so its
        prefix blocks (most likely to be shared again) are evicted last."""
        for block in blocks:
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} released twice"
            if self.ref_count[block] == 0:
                self.free[block] = None

    def match_prefix(
        self, token_ids: list[int], max_tokens: int, extra_keys: Sequence[tuple[str, ...]] = ()
    ) -> tuple[list[int], list[bytes]]:
        """Cached blocks covering the longest prefix of token_ids within max_tokens, referenced
        for the caller, and the chain of hashes of those blocks."""
        if not self.enable_prefix_caching:
            return [], []
        blocks, hashes = [], []
        parent = None
        bs = self.block_size
        for start in range(0, max_tokens - bs + 1, bs):
            h = block_hash(parent, tuple(token_ids[start : start + bs]), _extra(extra_keys, start // bs))
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            blocks.append(block)
            hashes.append(h)
            parent = h
        self.queries += max_tokens // bs
        self.hits += len(blocks)
        return blocks, hashes

    def unuse_hit(self, blocks: list[int]) -> None:
        """Hand back blocks of a match_prefix result the caller cannot use (past the last GDN
        snapshot of a hybrid model), uncounted as hits."""
        self.hits -= len(blocks)
        self.release(blocks[::-1])

    def register_full_blocks(
        self,
        blocks: list[int],
        hashes: list[bytes],
        token_ids: list[int],
        num_committed: int,
        extra_keys: Sequence[tuple[str, ...]] = (),
    ) -> None:
        """Hash every block of `blocks` now entirely filled with committed tokens (token_ids must
        hold them all). `hashes` is the request's chain so far and grows in place."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        assert num_committed <= len(token_ids), f"{num_committed} tokens committed but only {len(token_ids)} known"
        while (len(hashes) + 1) * bs <= num_committed:
            i = len(hashes)
            h = block_hash(hashes[-1] if hashes else None, tuple(token_ids[i * bs : (i + 1) * bs]), _extra(extra_keys, i))
            hashes.append(h)
            block = blocks[i]
            if h not in self.cached:  # an identical block may already be cached: keep that one
                self.cached[h] = block
                self.hash_of[block] = h
                self.next_token[block] = token_ids[(i + 1) * bs] if (i + 1) * bs < len(token_ids) else None

    def reset_prefix_cache(self) -> None:
        for block, h in enumerate(self.hash_of):
            if h is not None:
                self.hash_of[block] = None
                self.next_token[block] = None
        self.cached.clear()
        if self.snapshots is not None:
            self.snapshots.reset()
