"""Allocates every cache a model declares: KV blocks for attention layers from one memory budget,
and GDN state slots (one per concurrent sequence, then the prefix cache's snapshot slots) for
recurrent layers. Where the K/V scales of a
quantized cache come from is models/kv_scales.py's business."""

from __future__ import annotations

from dataclasses import dataclass

import numpy
import torch

from fp4serve.errors import ConfigError
from fp4serve.formats.kv_codec import KVCacheFormat
from fp4serve.layers.attention import PagedAttention
from fp4serve.layers.cache_spec import KVCacheSpec, StateSpec


@dataclass
class CacheCapacity:
    num_blocks: int
    block_size: int
    kv_bytes_per_token: int
    state_bytes: int  # the per-sequence slots'
    num_state_slots: int
    snapshot_bytes: int
    num_snapshots: int  # GDN snapshot slots, numbered from num_state_slots on
    kv_format: KVCacheFormat
    baseline_format: KVCacheFormat  # the model dtype: what `gain` compares with
    baseline_tokens: int  # tokens the same memory holds in baseline_format

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def gain(self) -> float:
        return self.num_tokens / self.baseline_tokens if self.baseline_tokens else 1.0


def zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor. On CPU through calloc (numpy.zeros): the OS hands out zeroed
    pages on first touch, so a large cache costs no start-up time and no resident memory until
    blocks are used. Zeros, not garbage: masked cache positions are still multiplied by 0, and
    0 * NaN would be NaN."""
    count = 1
    for n in shape:
        count *= n
    if device.type != "cpu" or count == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.from_numpy(numpy.zeros(count * dtype.itemsize, dtype=numpy.uint8)).view(dtype).view(shape)


def allocate_caches(
    layers,
    num_state_slots: int,
    memory_budget: int,
    block_size: int,
    kv_format: KVCacheFormat | torch.dtype,
    device: torch.device,
    model_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    snapshot_fraction: float = 0.0,
    max_snapshots: int = 0,
    padding_state_slot: bool = False,
) -> CacheCapacity:
    """Binds cache tensors to each layer (see models/base.py cache_layers) and returns the capacity.
    State slots are sized first (they are per sequence, not per token); KV blocks take the rest.
    kv_format: the KV storage (a plain dtype is accepted for a 16/32-bit cache). max_tokens: the
    most tokens the scheduler can hold at once (max_num_seqs x (max_model_len + lookahead)); no
    more blocks than those are allocated, however large the budget. snapshot_fraction: the share
    of the budget left after the sequences' state that goes to GDN snapshot slots, max_snapshots
    of them at most. padding_state_slot: one more state slot, after the snapshots, that no sequence
    owns (the padding rows of captured decode graphs write there)."""
    if isinstance(kv_format, torch.dtype):
        kv_format = KVCacheFormat.plain(kv_format)
    baseline = KVCacheFormat.plain(model_dtype) if model_dtype is not None else kv_format
    kv_layers = [m for m in layers if isinstance(m.cache_spec(), KVCacheSpec)]
    state_layers = [m for m in layers if isinstance(m.cache_spec(), StateSpec)]
    # Only PagedAttention encodes and decodes fp8/nvfp4 rows; other KV layers (the DFlash drafter's
    # context K/V) keep the model dtype in the same blocks.
    formats = {m: kv_format if isinstance(m, PagedAttention) else baseline for m in kv_layers}
    for head_dim in sorted({m.cache_spec().head_dim for m in kv_layers if formats[m] is kv_format}):
        kv_format.check_head_dim(head_dim)
    slot_bytes = sum(m.cache_spec().bytes_per_slot() for m in state_layers)
    state_bytes = slot_bytes * num_state_slots
    kv_per_token = sum(m.cache_spec().bytes_per_token(formats[m]) for m in kv_layers)
    baseline_per_token = sum(m.cache_spec().bytes_per_token(baseline) for m in kv_layers)
    if state_bytes > memory_budget:
        raise ConfigError(
            f"GDN state for {num_state_slots} sequences needs {state_bytes / 2**20:.1f} MiB, more than "
            f"--kv-cache-memory {memory_budget / 2**20:.1f} MiB: lower --max-num-seqs or raise the budget"
        )
    num_snapshots = (
        min(max_snapshots, int((memory_budget - state_bytes) * snapshot_fraction) // slot_bytes) if slot_bytes else 0
    )
    kv_budget = memory_budget - state_bytes - num_snapshots * slot_bytes
    num_blocks = kv_budget // (kv_per_token * block_size) if kv_layers else 0
    if max_tokens is not None:
        num_blocks = min(num_blocks, -(-max_tokens // block_size))
    baseline_tokens = kv_budget // (baseline_per_token * block_size) * block_size if kv_layers else 0
    for layer in kv_layers:
        fmt = formats[layer]
        shape = layer.cache_spec().block_shape(num_blocks, block_size, fmt)
        k, v = (zeros(shape, fmt.storage_dtype, device) for _ in range(2))
        if isinstance(layer, PagedAttention):
            layer.bind_cache(k, v, fmt)
        else:
            layer.bind_cache(k, v)
    for layer in state_layers:
        tensors = {
            name: zeros((num_state_slots + num_snapshots + int(padding_state_slot), *shape), dtype, device)
            for name, shape, dtype in layer.cache_spec().tensors
        }
        layer.bind_cache(**tensors)
    return CacheCapacity(
        num_blocks, block_size, kv_per_token, state_bytes, num_state_slots, num_snapshots * slot_bytes, num_snapshots,
        kv_format, baseline, baseline_tokens,
    )  # fmt: skip
