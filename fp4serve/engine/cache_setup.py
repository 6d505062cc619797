"""The engine's caches, sized and built once at start: the KV/GDN budget (--kv-cache-memory or
--gpu-memory-utilization), the tensors of every cache layer (target and drafter), the GDN snapshots
of hybrid prefix caching, the block pool and the scheduler over them, and the start-log lines that
say what was allocated."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fp4serve.config import EngineConfig, ModelInfo
from fp4serve.engine.block_pool import BlockPool
from fp4serve.engine.cache import CacheCapacity, allocate_caches
from fp4serve.engine.memory import kv_cache_budget, weight_bytes
from fp4serve.engine.scheduler import Scheduler
from fp4serve.engine.snapshot_pool import SnapshotPool
from fp4serve.errors import ConfigError
from fp4serve.formats.kv_codec import KVCacheFormat
from fp4serve.layers.cache_spec import StateSpec
from fp4serve.max_model_len import AUTO
from fp4serve.models.kv_scales import kv_scale_source
from fp4serve.spec_decode.proposer import Proposer

log = logging.getLogger(__name__)


@dataclass
class Caches:
    capacity: CacheCapacity
    block_pool: BlockPool
    scheduler: Scheduler
    kv_cache_memory: int  # the budget, in bytes
    max_model_len: int  # --max-model-len auto may lower it to what the cache holds
    padding_state_slot: int  # the state slot past every sequence's and snapshot's (0 when none is allocated)


def build_caches(
    config: EngineConfig,
    model,
    proposer: Proposer | None,
    num_speculative_tokens: int,
    kv_format: KVCacheFormat,
    info: ModelInfo,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    eos_token_ids,
    device_total: tuple[int, str] | None,
    padding_state_slot: bool = False,
) -> Caches:
    """num_speculative_tokens: 0 without drafting. device_total: the device's memory when
    --gpu-memory-utilization sizes the budget, else None. padding_state_slot: a GDN state slot for
    the padding rows of captured decode graphs (Caches.padding_state_slot)."""
    layers = model.cache_layers()
    if proposer is not None:
        layers += proposer.cache_layers()  # drafter KV: same blocks and block tables as the target's
    hybrid = any(isinstance(m.cache_spec(), StateSpec) for m in layers)
    # No more KV than the scheduler can fill: every sequence at max_model_len, plus room for
    # the drafts a step verifies beyond it and a partial last block.
    lookahead = (num_speculative_tokens + 1 if num_speculative_tokens else 0) + config.block_size
    weights = 0
    if device_total is not None:
        weight_modules = [model, *(proposer.weight_modules() if proposer else [])]
        weights = weight_bytes(device, weight_modules)
    kv_cache_memory = kv_cache_budget(config, device_total, weights)
    max_tokens = config.max_num_seqs * (max_model_len + lookahead)
    mamba_mode = config.mamba_cache_mode or "align"
    snapshots_wanted = hybrid and config.enable_prefix_caching and mamba_mode != "none"
    capacity = allocate_caches(
        layers, config.max_num_seqs if hybrid else 0, kv_cache_memory, config.block_size, kv_format,
        device, dtype, max_tokens=max_tokens,
        snapshot_fraction=config.gdn_snapshot_fraction if snapshots_wanted else 0.0,
        max_snapshots=max_tokens // config.mamba_block_size + config.max_num_seqs if snapshots_wanted else 0,
        padding_state_slot=padding_state_slot and hybrid,
    )  # fmt: skip
    scales = kv_scale_source(layers, kv_format, config.calculate_kv_scales)
    declared = info.quant.kv_cache_algo if info.quant else None
    if declared and not kv_format.quantized:
        log.info("the checkpoint declares a %s KV cache; --kv-cache-dtype %s keeps K/V in %s (pass --kv-cache-dtype %s to use it)",
                 declared, config.kv_cache_dtype, kv_format.name, declared.lower())  # fmt: skip
    if capacity.num_tokens < max_model_len and config.max_model_len == AUTO:
        # vLLM's --max-model-len auto: the longest context the cache holds, when the model's does not fit
        log.warning(
            "--max-model-len auto: the KV cache holds %d tokens, fewer than the model's %d; max_model_len is %d",
            capacity.num_tokens, max_model_len, capacity.num_tokens,
        )  # fmt: skip
        max_model_len = capacity.num_tokens
    if capacity.num_tokens < max_model_len:
        raise ConfigError(
            f"the KV cache holds {capacity.num_tokens} tokens, fewer than max_model_len {max_model_len}: "
            f"raise --kv-cache-memory (or --gpu-memory-utilization) or lower --max-model-len"
        )
    prefix_caching = config.enable_prefix_caching
    snapshots = SnapshotPool(capacity.num_snapshots, capacity.num_state_slots) if capacity.num_snapshots else None
    if prefix_caching and hybrid and snapshots is None:
        why = "--mamba-cache-mode none" if mamba_mode == "none" else "no GDN snapshot fits the budget"
        log.info("prefix caching is off: a hit on this hybrid model needs a GDN state snapshot (%s)", why)
        prefix_caching = False
    block_pool = BlockPool(capacity.num_blocks, config.block_size, prefix_caching, snapshots)
    scheduler = Scheduler(
        block_pool, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
        capacity.num_state_slots, eos_token_ids, mamba_block_size=config.mamba_block_size,
        keep_every_snapshot=mamba_mode == "all",
        drafter_lookahead=proposer.cache_lookahead if proposer else 0,
    )  # fmt: skip
    if snapshots is not None:
        log.info(
            "prefix caching on a hybrid model: %d GDN snapshots (%.1f MiB, %.1f MiB each; --mamba-cache-mode %s, "
            "prefill snapshots every %d tokens)",
            capacity.num_snapshots, capacity.snapshot_bytes / 2**20,
            capacity.snapshot_bytes / capacity.num_snapshots / 2**20, mamba_mode, config.mamba_block_size,
        )  # fmt: skip
    log.info(
        "KV cache: %s, %s tokens (%.1fx of %s): %d blocks x %d tokens (%.1f KiB/token, %.1f MiB of a budget of "
        "%.1f MiB; sized for --max-num-seqs %d x --max-model-len %d at most), GDN state %.1f MiB for %d slots; "
        "maximum concurrency for %d tokens per request: %.2fx; KV scales: %s",
        kv_format.name, _count(capacity.num_tokens), capacity.gain, capacity.baseline_format.name,
        capacity.num_blocks, capacity.block_size, capacity.kv_bytes_per_token / 1024,
        capacity.num_tokens * capacity.kv_bytes_per_token / 2**20, kv_cache_memory / 2**20,
        config.max_num_seqs, max_model_len, capacity.state_bytes / 2**20,
        capacity.num_state_slots, max_model_len, capacity.num_tokens / max_model_len, scales,
    )  # fmt: skip
    padding_slot = capacity.num_state_slots + capacity.num_snapshots if padding_state_slot and hybrid else 0
    return Caches(capacity, block_pool, scheduler, kv_cache_memory, max_model_len, padding_slot)


def _count(n: int) -> str:
    """1234567 -> '1.2M', as the capacity log line shows it."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e4 else str(n)
