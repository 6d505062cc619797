"""What a layer asks the engine to allocate. Models declare, the engine allocates (DESIGN.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """An attention layer: K and V blocks from the shared pool, [num_blocks, block_size, Hkv, D]."""

    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class StateSpec:
    """A recurrent layer (GDN): fixed-size state per sequence slot. `tensors` maps a name to
    (shape without the slot dimension, dtype); the engine binds [num_slots, *shape] tensors with
    `layer.bind_cache(**tensors)`."""

    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    def bytes_per_slot(self) -> int:
        total = 0
        for _, shape, dtype in self.tensors:
            n = 1
            for d in shape:
                n *= d
            total += n * dtype.itemsize
        return total
