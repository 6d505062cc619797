"""The memory budget of the KV cache and GDN state: --kv-cache-memory when given, else
--gpu-memory-utilization's share of the device less the weights (vLLM's rule), else 2GiB. Either
way the cache is then capped at what --max-num-seqs sequences of --max-model-len can fill
(engine._init_caches), so a generous fraction never allocates memory the scheduler cannot use."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from fp4serve.config import EngineConfig
from fp4serve.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_KV_CACHE_MEMORY = 2 * 2**30
GIB = 2**30


def device_memory(device: torch.device) -> tuple[int, str]:
    """The memory --gpu-memory-utilization is a fraction of, and its name for the log: a GPU's
    total memory (as vLLM), or on CPU the RAM available now, since the machine's total is shared
    with everything else running on it. Read before the weights load."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1], "total GPU memory"
    return available_ram(), "available RAM"


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError) as e:
        raise ConfigError("cannot read the available RAM for --gpu-memory-utilization; pass --kv-cache-memory") from e


def weight_bytes(device: torch.device, modules: list[nn.Module]) -> int:
    """What the loaded weights take: on CUDA everything torch holds on the device (weights,
    drafter, quantization scratch), which is vLLM's measure less its activation profile; on CPU the
    parameters and buffers of the modules, each storage counted once (drafters share the
    target's embedding)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    storages = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def kv_cache_budget(config: EngineConfig, device_total: tuple[int, str] | None, weights: int) -> int:
    """Bytes for KV cache and GDN state. device_total: device_memory() before the weights loaded
    (None unless --gpu-memory-utilization sizes the cache); weights: weight_bytes() after."""
    fraction = config.gpu_memory_utilization
    if config.kv_cache_memory is not None:
        if fraction is not None:
            log.info("--kv-cache-memory sets the cache size; --gpu-memory-utilization %g does not (vLLM's rule "
                     "for --kv-cache-memory-bytes)", fraction)  # fmt: skip
        return config.kv_cache_memory
    if fraction is None:
        return DEFAULT_KV_CACHE_MEMORY
    total, what = device_total
    budget = int(fraction * total) - weights
    if budget <= 0:
        raise ConfigError(
            f"--gpu-memory-utilization {fraction:g} leaves no memory for the KV cache: {fraction:g} x {what} "
            f"{total / GIB:.1f} GiB is {fraction * total / GIB:.1f} GiB and the weights take {weights / GIB:.1f} GiB; "
            "raise it or pass --kv-cache-memory"
        )
    log.info(
        "--gpu-memory-utilization %g: %.2f GiB for KV cache and GDN state = %g x %s %.1f GiB - weights %.2f GiB "
        "(activations are not profiled as vLLM does: lower the fraction if steps run out of memory)",
        fraction, budget / GIB, fraction, what, total / GIB, weights / GIB,
    )  # fmt: skip
    return budget
