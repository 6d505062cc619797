"""Quantize one built decoder layer into output tensors: each Linear the recipe quantizes becomes
NVFP4 with one global scale per fused group (q/k/v, gate/up, in_proj_qkv + in_proj_z,
in_proj_b + in_proj_a: what vLLM needs, docs/reference.md section 2); every other tensor of the
layer is returned as the source stored it, bit for bit, unless AWQ folded a scale into it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fp4serve.errors import ConfigError
from fp4serve.formats.nvfp4 import E2M1_MAX, E4M3_MAX, quantize_nvfp4
from fp4serve.layers.linear import Linear
from fp4serve.quantize.awq import AWQ_ALGORITHMS, apply_awq
from fp4serve.quantize.export_layout import linear_tensors
from fp4serve.quantize.layer_calibration import LayerStats
from fp4serve.quantize.recipes import Recipe
from fp4serve.quantize.source_model import LinearShard, SourceModel


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # output name -> tensor, for this layer's shard
    quantized: list[str] = field(default_factory=list)  # checkpoint modules stored NVFP4
    kept: list[str] = field(default_factory=list)  # checkpoint Linear modules kept 16-bit


def decide(shards: dict[Linear, list[LinearShard]], recipe: Recipe) -> dict[Linear, bool]:
    """Per fused Linear: quantize or not. A recipe or pattern that splits a fused group is refused
    (vLLM and fp4serve load a fused group all NVFP4 or all 16-bit)."""
    decisions = {}
    for linear, parts in shards.items():
        reasons = [recipe.kept_by(p.module) for p in parts]
        if len({r is None for r in reasons}) > 1:
            split = ", ".join(f"{p.module}: {'NVFP4' if r is None else r}" for p, r in zip(parts, reasons))
            raise ConfigError(f"the patterns split a fused group ({split}); quantize all of it or none")
        quantize = reasons[0] is None and linear.in_features % 16 == 0
        decisions[linear] = quantize
    return decisions


def quantize_layer(
    source: SourceModel,
    index: int,
    layer,
    raw: dict[str, torch.Tensor],
    stats: LayerStats,
    recipe: Recipe,
    fmt: str,
    algorithm: str,
    w4a4: bool,
) -> LayerResult:
    """raw: decoder layer `index`'s source tensors as stored; layer: built from them (float32)."""
    shards = source.linear_shards(layer)
    decisions = decide(shards, recipe)
    weights = {linear: linear.weight.detach().clone() for linear in shards}
    norms, biases, clip = set(), {}, {}
    if algorithm in AWQ_ALGORITHMS:
        norms, biases, clip = apply_awq(layer, decisions, weights, stats, algorithm)
    changed = changed_tensors(source, index, layer, shards, decisions, weights, norms, biases, raw)
    result = LayerResult({})
    consumed = set()
    for linear, parts in shards.items():
        if not decisions[linear]:
            result.kept += [p.module for p in parts]
            continue
        weight = weights[linear]
        amax = weight.abs().max().item()  # one global scale for the whole fused group (before clipping)
        if amax == 0:
            amax = E2M1_MAX * E4M3_MAX  # an all-zero matrix: global scale 1.0
        if linear in clip:
            weight = torch.minimum(torch.maximum(weight, -clip[linear]), clip[linear])
        g = torch.tensor(amax / (E2M1_MAX * E4M3_MAX))
        input_amax = stats.inputs[linear].amax if w4a4 else None
        for p in parts:
            q = quantize_nvfp4(weight[p.rows], global_scale=g)
            result.tensors.update(linear_tensors(fmt, p.module, q, amax, input_amax, None))
            result.quantized.append(p.module)
            consumed.add(f"{p.module}.weight")
    for name, tensor in raw.items():
        if name not in consumed:
            result.tensors[name] = changed.get(name, tensor)
    return result


def changed_tensors(source, index, layer, shards, decisions, weights, norms, biases, raw) -> dict[str, torch.Tensor]:
    """The source tensors AWQ folding rewrote, by source name, in their stored dtype: norm weights,
    biases, and the weights of 16-bit Linears that read a scaled norm."""
    changed = {}
    layer_prefix = source.source_name(f"model.layers.{index}")
    for path, module in layer.named_modules():
        if module in norms:
            name = f"{layer_prefix}.{path}.weight"
            changed[name] = module.weight.detach().to(raw[name].dtype)
    for linear, parts in shards.items():
        for p in parts:
            if not decisions[linear] and not torch.equal(weights[linear], linear.weight):
                name = f"{p.module}.weight"
                changed[name] = weights[linear][p.rows].to(raw[name].dtype)
            if linear in biases:
                name = f"{p.module}.bias"
                changed[name] = biases[linear][p.rows].to(raw[name].dtype)
    return changed
