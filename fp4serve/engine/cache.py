"""Allocates every cache a model declares: KV blocks for attention layers from one memory budget,
and GDN state slots (one per concurrent sequence) for recurrent layers. Sets up the K/V scales of
an fp8 or nvfp4 KV cache (checkpoint, 1.0 default, or calibration on the first prefill)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy
import torch

from fp4serve.errors import ConfigError
from fp4serve.layers.attention import PagedAttention
from fp4serve.layers.cache_spec import KVCacheSpec, StateSpec
from fp4serve.layers.kv_quant import KVCacheFormat

log = logging.getLogger(__name__)


@dataclass
class CacheCapacity:
    num_blocks: int
    block_size: int
    kv_bytes_per_token: int
    state_bytes: int
    num_state_slots: int
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
    layers, num_state_slots: int, memory_budget: int, block_size: int, kv_format: KVCacheFormat | torch.dtype,
    device: torch.device, model_dtype: torch.dtype | None = None, max_tokens: int | None = None,
) -> CacheCapacity:  # fmt: skip
    """Binds cache tensors to each layer (see models/base.py cache_layers) and returns the capacity.
    State slots are sized first (they are per sequence, not per token); KV blocks take the rest.
    kv_format: the KV storage (a plain dtype is accepted for a 16/32-bit cache). max_tokens: the
    most tokens the scheduler can hold at once (max_num_seqs x (max_model_len + lookahead)); no
    more blocks than those are allocated, however large the budget."""
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
    state_bytes = sum(m.cache_spec().bytes_per_slot() for m in state_layers) * num_state_slots
    kv_per_token = sum(m.cache_spec().bytes_per_token(formats[m]) for m in kv_layers)
    baseline_per_token = sum(m.cache_spec().bytes_per_token(baseline) for m in kv_layers)
    if state_bytes > memory_budget:
        raise ConfigError(
            f"GDN state for {num_state_slots} sequences needs {state_bytes / 2**20:.1f} MiB, more than "
            f"--kv-cache-memory {memory_budget / 2**20:.1f} MiB: lower --max-num-seqs or raise the budget"
        )
    kv_budget = memory_budget - state_bytes
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
            name: zeros((num_state_slots, *shape), dtype, device)
            for name, shape, dtype in layer.cache_spec().tensors
        }
        layer.bind_cache(**tensors)
    return CacheCapacity(
        num_blocks, block_size, kv_per_token, state_bytes, num_state_slots, kv_format, baseline, baseline_tokens
    )


def setup_kv_scales(layers, kv_format: KVCacheFormat, calculate: bool) -> str:
    """Decides where each attention layer's k_scale / v_scale come from and returns that source in
    words for the start log: --calculate-kv-scales (amax on the first prefill) over the checkpoint's
    tensors over 1.0. A 16/32-bit cache uses no scales."""
    kv_layers = [m for m in layers if isinstance(m, PagedAttention)]
    loaded = sum(m.loaded_scales == {"k", "v"} for m in kv_layers)
    if not kv_format.quantized:
        return "none" + (f" (the checkpoint's k/v scales of {loaded} layers are unused)" if loaded else "")
    if calculate:
        for m in kv_layers:
            m.calibrate_kv_scales = True
        rule = "amax/448" if kv_format.name == "fp8_e4m3" else "amax/(6*448)"
        overrides = f"; overrides the checkpoint's scales of {loaded} layers" if loaded else ""
        return f"calibrated per layer on the first prefill ({rule}, --calculate-kv-scales{overrides})"
    partial = [m for m in kv_layers if m.loaded_scales and m.loaded_scales != {"k", "v"}]
    if partial:
        log.warning("%d attention layers have only one of k_scale/v_scale in the checkpoint; the other is 1.0", len(partial))
    if loaded == len(kv_layers):
        return f"from the checkpoint ({loaded} layers)"
    if kv_format.name == "fp8_e4m3":
        log.warning(
            "fp8 KV cache: %d of %d attention layers have no k_scale/v_scale in the checkpoint and use 1.0 "
            "(|values| beyond 448 saturate); --calculate-kv-scales calibrates them on the first prefill",
            len(kv_layers) - loaded, len(kv_layers),
        )  # fmt: skip
    what = "1.0" if kv_format.name == "fp8_e4m3" else "global scale 1.0 (the per-16 E4M3 block scales carry the range)"
    return f"{what} for {len(kv_layers) - loaded} layers" + (f", from the checkpoint for {loaded}" if loaded else "")
