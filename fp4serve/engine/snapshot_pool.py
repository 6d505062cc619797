"""GDN state snapshots for prefix caching on hybrid models: which snapshot slot holds the state
(every GDN layer's conv window and recurrent state) after which prefix.

A snapshot at position m is keyed by the hash of the KV block that ends at m (block_pool.py), so
it covers exactly the tokens that hash covers; the block pool drops it when it evicts that block,
so a snapshot is findable only while its block chain is. Slots are extra rows of the GDN layers'
state tensors (engine/cache.py), numbered first_slot .. first_slot + capacity - 1. A snapshot is
referenced while a request holds it as its latest one (`hold`), and otherwise sits in an LRU queue
from which new snapshots take the oldest. Copying states in and out is the runner's business."""

from __future__ import annotations

from collections import OrderedDict


class SnapshotPool:
    def __init__(self, capacity: int, first_slot: int):
        self.capacity = capacity
        self.first_slot = first_slot
        self.key_of: dict[int, bytes | None] = {}
        self.ref_count: dict[int, int] = {}
        self.cached: dict[bytes, int] = {}  # block hash -> snapshot slot
        # Unreferenced slots, oldest first: empty ones and cached ones that nothing holds.
        self.lru: OrderedDict[int, None] = OrderedDict()
        for slot in range(first_slot, first_slot + capacity):
            self.key_of[slot], self.ref_count[slot] = None, 0
            self.lru[slot] = None
        self.hits = 0

    def lookup(self, key: bytes) -> int | None:
        """The slot of the snapshot keyed `key`, freshened in the LRU order; None if there is none."""
        slot = self.cached.get(key)
        if slot is not None and slot in self.lru:
            self.lru.move_to_end(slot)
        return slot

    def take(self, key: bytes) -> int | None:
        """A slot for a new snapshot keyed `key` (the caller fills it in this step), evicting the
        least recently used unreferenced snapshot; None if `key` is cached already or every slot
        is held."""
        if key in self.cached or not self.lru:
            return None
        slot, _ = self.lru.popitem(last=False)
        self._forget(slot)
        self.key_of[slot] = key
        self.cached[key] = slot
        self.lru[slot] = None
        return slot

    def hold(self, slot: int) -> None:
        """Keep `slot` from eviction (a request's latest snapshot, until it takes a newer one)."""
        self.ref_count[slot] += 1
        self.lru.pop(slot, None)

    def unhold(self, slot: int) -> None:
        self.ref_count[slot] -= 1
        assert self.ref_count[slot] >= 0, f"snapshot slot {slot} released twice"
        if self.ref_count[slot] == 0:
            self.lru[slot] = None

    def drop(self, key: bytes) -> None:
        """Forget the snapshot keyed `key` (its block was evicted): its slot can be reused at once."""
        slot = self.cached.get(key)
        if slot is None:
            return
        self._forget(slot)
        if self.ref_count[slot] == 0:
            self.lru.move_to_end(slot, last=False)  # an empty slot goes first

    def reset(self) -> None:
        for key in list(self.cached):
            self.drop(key)

    def _forget(self, slot: int) -> None:
        key = self.key_of[slot]
        if key is not None:
            del self.cached[key]
            self.key_of[slot] = None

    @property
    def num_cached(self) -> int:
        return len(self.cached)
