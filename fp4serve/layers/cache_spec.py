"""What a layer asks the engine to allocate. Models declare, the engine allocates (docs/architecture.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4serve.formats.kv_codec import KVCacheFormat


@dataclass(frozen=True)
class KVCacheSpec:
    """An attention layer: K and V blocks from the shared pool, [num_blocks, block_size, Hkv, row_width]
    in the storage of the chosen --kv-cache-dtype (formats/kv_codec.py)."""

    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, kv_format: KVCacheFormat) -> int:
        """K and V of one token: 4*Hkv*D bytes in bf16, 2*Hkv*D in fp8, 2*Hkv*(D/2 + D/16) in nvfp4."""
        return kv_format.bytes_per_token(self.num_kv_heads, self.head_dim)

    def block_shape(self, num_blocks: int, block_size: int, kv_format: KVCacheFormat) -> tuple[int, ...]:
        return (num_blocks, block_size, self.num_kv_heads, kv_format.row_width(self.head_dim))


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
