"""Activation-aware scaling (AWQ) for NVFP4, as ModelOpt's variants search it (docs/quantization.md):

- awq-lite: per input channel a scale s = mean|x|^alpha / mean|w|^(1-alpha) (normalized), alpha in
  0, 0.1, ..., 1, keeping the one (or no scale) with the least output error of Q(W s) (x / s) on the
  calibration inputs;
- awq-clip: per 16-block of weights a clipping ratio 1.0, 0.95, ..., 0.5 of the block amax, chosen
  by the block's own output error (e^T X_b^T X_b e, exact per block);
- awq-full: lite, then clip on the scaled weights.

A scale is only applied where it folds into the operation before the Linear, so the output stays a
plain NVFP4 checkpoint every loader reads: the RMSNorm before q/k/v, gate/up or the GDN input
projections (all its consumers are scaled, 16-bit ones too), the up rows before down_proj, the v
rows before o_proj when there are as many KV heads as heads. Elsewhere (MoE expert inputs, which
share the norm with the router; GDN out_proj; GQA o_proj) only clipping applies."""

from __future__ import annotations

import torch
from torch import nn

from fp4serve.formats.nvfp4 import E2M1_MAX, E4M3_MAX, dequantize_nvfp4, quantize_nvfp4
from fp4serve.layers.linear import Linear
from fp4serve.layers.norm import RMSNorm
from fp4serve.quantize.layer_calibration import LayerStats

AWQ_ALGORITHMS = ("awq-lite", "awq-clip", "awq-full")
ALPHAS = [i / 10 for i in range(11)]
CLIP_RATIOS = [1.0 - 0.05 * i for i in range(11)]
BLOCK = 16


def fake_quantize(weight: torch.Tensor, global_amax: float | None = None) -> torch.Tensor:
    amax = weight.abs().max().item() if global_amax is None else global_amax
    g = amax / (E2M1_MAX * E4M3_MAX) if amax > 0 else 1.0
    return dequantize_nvfp4(quantize_nvfp4(weight, global_scale=g))


def output_error(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> float:
    reference = x @ weight.T
    return (reference - (x / scale) @ fake_quantize(weight * scale).T).pow(2).mean().item()


def search_scale(weight: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor | None:
    """The awq-lite scale [in] for weight [out, in] reading inputs x [N, in], or None when no
    scale beats the unscaled weights."""
    blocks = weight.abs().unflatten(-1, (-1, BLOCK))
    w_mean = (blocks / blocks.amax(-1, keepdim=True).clamp(min=1e-12)).flatten(-2).mean(0)
    best, best_scale = output_error(weight, x, torch.ones_like(mean_abs)), None
    for alpha in ALPHAS:
        s = mean_abs.clamp(min=1e-8).pow(alpha) / w_mean.clamp(min=1e-4).pow(1 - alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        error = output_error(weight, x, s)
        if error < best:
            best, best_scale = error, s
    return best_scale


def search_clip(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-element clip bounds [out, in] (each block's chosen ratio times its amax)."""
    blocks = weight.unflatten(-1, (-1, BLOCK))
    amax = blocks.abs().amax(-1, keepdim=True)
    xb = x.unflatten(-1, (-1, BLOCK))
    gram = torch.einsum("nbk,nbl->bkl", xb, xb)
    global_amax = weight.abs().max().item()  # the global scale stays the unclipped one's
    best_error = torch.full(amax.shape[:-1], float("inf"))
    best_ratio = torch.ones_like(best_error)
    for ratio in CLIP_RATIOS:
        clipped = torch.minimum(torch.maximum(blocks, -ratio * amax), ratio * amax)
        error = blocks - fake_quantize(clipped.flatten(-2), global_amax).unflatten(-1, (-1, BLOCK))
        cost = torch.einsum("obk,bkl,obl->ob", error, gram, error)
        better = cost < best_error
        best_error = torch.where(better, cost, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return (best_ratio.unsqueeze(-1) * amax).expand_as(blocks).flatten(-2)


def fold_sites(layer: nn.Module) -> list[tuple[object, list[Linear]]]:
    """(what comes before, the Linears reading its output): an RMSNorm, or (Linear, shard) whose
    output rows are the input channels."""
    sites = []
    attn = getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None)
    mixer_inputs = [m for m in (getattr(attn, n, None) for n in ("qkv_proj", "in_proj_qkvz", "in_proj_ba")) if m]
    sites.append((layer.input_layernorm, mixer_inputs))
    qkv = getattr(attn, "qkv_proj", None)
    if qkv is not None and attn.o_proj.in_features == qkv.output_sizes[2]:
        sites.append(((qkv, 2), [attn.o_proj]))
    mlps = [layer.mlp]
    if hasattr(layer.mlp, "experts"):  # MoE: the norm also feeds the router; only down_proj folds
        mlps = [*layer.mlp.experts, layer.mlp.shared_expert]
    else:
        sites.append((layer.post_attention_layernorm, [layer.mlp.gate_up_proj]))
    for mlp in mlps:
        sites.append(((mlp.gate_up_proj, 1), [mlp.down_proj]))
    return sites


def fold(before, scale: torch.Tensor, weights: dict, biases: dict) -> None:
    """Divide the output of `before` by scale (its consumers were multiplied by it)."""
    if isinstance(before, RMSNorm):
        w = before.weight.data.float()
        before.weight.data.copy_((1 + w) / scale - 1 if before.zero_centered else w / scale)
        return
    linear, shard = before
    rows = linear.shard_rows(shard)
    weights[linear][rows] /= scale[:, None]
    if linear.bias is not None:
        biases.setdefault(linear, linear.bias.detach().clone())[rows] /= scale


def apply_awq(layer, decisions: dict[Linear, bool], weights: dict[Linear, torch.Tensor], stats: LayerStats,
              algorithm: str) -> tuple[set[RMSNorm], dict[Linear, torch.Tensor], dict[Linear, torch.Tensor]]:  # fmt: skip
    """Scale and fold `weights` in place; returns (norms changed, biases changed, clip bounds)."""
    norms, biases, clip, scales = set(), {}, {}, {}
    if algorithm in ("awq-lite", "awq-full"):
        for before, consumers in fold_sites(layer):
            quantized = [c for c in consumers if decisions[c]]
            record = stats.inputs[consumers[0]]
            if not quantized or record.rows == 0:
                continue
            weight = torch.cat([weights[c] for c in quantized])
            scale = search_scale(weight, record.inputs(), record.mean_abs)
            if scale is None:
                continue
            for c in consumers:
                weights[c] *= scale
                scales[c] = scale
            fold(before, scale, weights, biases)
            if isinstance(before, RMSNorm):
                norms.add(before)
    if algorithm in ("awq-clip", "awq-full"):
        for linear, quantize in decisions.items():
            record = stats.inputs[linear]
            if quantize and record.rows:
                x = record.inputs()
                clip[linear] = search_clip(weights[linear], x / scales[linear] if linear in scales else x)
    return norms, biases, clip
