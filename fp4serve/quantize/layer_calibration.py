"""Run the calibration activations through one decoder layer and record what quantization needs:
per Linear the input amax (W4A4 input scales), the mean |x| per input channel and a bounded sample
of input rows (AWQ), per attention layer the K/V amax (KV-cache scales)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fp4serve.engine.cache import allocate_caches
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.layers.attention import PagedAttention
from fp4serve.layers.linear import Linear

BLOCK_SIZE = 16
MAX_SAMPLED_ROWS = 512  # input rows kept per Linear for the AWQ search: memory stays bounded


@dataclass
class InputStats:
    amax: float = 0.0
    abs_sum: torch.Tensor | None = None  # [in] sum of |x| over rows
    rows: int = 0
    sampled: list[torch.Tensor] = field(default_factory=list)
    keep_rows: bool = False

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        self.amax = max(self.amax, x.abs().max().item())
        total = x.abs().sum(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.rows += x.shape[0]
        if self.keep_rows:
            kept = sum(t.shape[0] for t in self.sampled)
            if kept < MAX_SAMPLED_ROWS:
                step = max(1, x.shape[0] // max(1, MAX_SAMPLED_ROWS // 8))
                self.sampled.append(x[::step][: MAX_SAMPLED_ROWS - kept].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.rows

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.sampled)


@dataclass
class LayerStats:
    inputs: dict[Linear, InputStats]
    kv_amax: dict[PagedAttention, list[float]]  # [k amax, v amax]


def bind_caches(layer: nn.Module, max_tokens: int) -> None:
    """KV blocks and GDN state for one sequence of up to max_tokens tokens, in float32."""
    layers = [m for m in layer.modules() if hasattr(m, "cache_spec")]
    if layers:
        budget = 1 << 40  # bounded by max_tokens, not by this
        allocate_caches(layers, 1, budget, BLOCK_SIZE, torch.float32, torch.device("cpu"), max_tokens=max_tokens)


def run_layer(
    layer: nn.Module, hidden: list[torch.Tensor], samples: list[list[int]], keep_rows: bool
) -> tuple[list[torch.Tensor], LayerStats]:
    """hidden[i]: the layer's input for sample i [T_i, H]. Returns the outputs and the statistics."""
    stats = LayerStats({}, {})
    hooks = []
    for module in layer.modules():
        if isinstance(module, Linear):
            record = stats.inputs[module] = InputStats(keep_rows=keep_rows)
            hooks.append(module.register_forward_pre_hook(lambda m, args, r=record: r.add(args[0])))
        elif isinstance(module, PagedAttention):
            amax = stats.kv_amax[module] = [0.0, 0.0]

            def record_kv(m, args, amax=amax):
                amax[0] = max(amax[0], args[1].abs().max().item())
                amax[1] = max(amax[1], args[2].abs().max().item())

            hooks.append(module.register_forward_pre_hook(record_kv))
    try:
        outputs = forward_samples(layer, hidden, samples)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, stats


def forward_samples(layer: nn.Module, hidden: list[torch.Tensor], samples: list[list[int]]) -> list[torch.Tensor]:
    """Each sample through the layer as one fresh sequence (its own prefill)."""
    outputs = []
    with torch.inference_mode():
        for x, ids in zip(hidden, samples):
            blocks = list(range(-(-len(ids) // BLOCK_SIZE)))
            batch = build_batch([SequenceRows(list(ids), 0, blocks)], BLOCK_SIZE)
            outputs.append(layer(x, batch))
    return outputs
