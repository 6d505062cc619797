"""Allocates every cache a model declares: KV blocks for attention layers from one memory budget,
and GDN state slots (one per concurrent sequence) for recurrent layers."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fp4serve.errors import ConfigError
from fp4serve.layers.cache_spec import KVCacheSpec, StateSpec

log = logging.getLogger(__name__)


@dataclass
class CacheCapacity:
    num_blocks: int
    block_size: int
    kv_bytes_per_token: int
    state_bytes: int
    num_state_slots: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def allocate_caches(
    layers, num_state_slots: int, memory_budget: int, block_size: int, kv_dtype: torch.dtype, device: torch.device
) -> CacheCapacity:
    """Binds cache tensors to each layer (see models/base.py cache_layers) and returns the capacity.
    State slots are sized first (they are per sequence, not per token); KV blocks take the rest."""
    kv_layers = [m for m in layers if isinstance(m.cache_spec(), KVCacheSpec)]
    state_layers = [m for m in layers if isinstance(m.cache_spec(), StateSpec)]
    state_bytes = sum(m.cache_spec().bytes_per_slot() for m in state_layers) * num_state_slots
    kv_per_token = sum(2 * s.num_kv_heads * s.head_dim * kv_dtype.itemsize for s in (m.cache_spec() for m in kv_layers))
    if state_bytes > memory_budget:
        raise ConfigError(
            f"GDN state for {num_state_slots} sequences needs {state_bytes / 2**20:.1f} MiB, more than "
            f"--kv-cache-memory {memory_budget / 2**20:.1f} MiB: lower --max-num-seqs or raise the budget"
        )
    num_blocks = (memory_budget - state_bytes) // (kv_per_token * block_size) if kv_layers else 0
    for layer in kv_layers:
        spec = layer.cache_spec()
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        layer.bind_cache(torch.zeros(shape, dtype=kv_dtype, device=device), torch.zeros(shape, dtype=kv_dtype, device=device))
    for layer in state_layers:
        tensors = {
            name: torch.zeros((num_state_slots, *shape), dtype=dtype, device=device)
            for name, shape, dtype in layer.cache_spec().tensors
        }
        layer.bind_cache(**tensors)
    return CacheCapacity(num_blocks, block_size, kv_per_token, state_bytes, num_state_slots)
