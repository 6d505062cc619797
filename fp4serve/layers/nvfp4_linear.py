"""NVFP4 Linear weights: packed E2M1 codes + FP8 block scales + FP32 global scales, kept 4-bit in memory.

One method object per Linear, for three sources of weights:
- `modelopt` checkpoints: `weight` (uint8), `weight_scale`, `weight_scale_2` (multiplier),
  `input_scale` (multiplier), `pre_quant_scale` (AWQ, per input channel);
- `compressed-tensors` nvfp4-pack-quantized: `weight_packed`, `weight_scale`, `weight_global_scale`
  (divisor), `input_global_scale` (divisor);
- `nvfp4` on the fly: a 16-bit `weight`, quantized once all its shards are loaded.
Internally every global scale is a multiplier (ModelOpt's convention), one per shard.

Compute modes: `w4a16` dequantizes the weights and keeps 16-bit activations (what Hopper, Ampere and
CPUs do); `w4a4` first quantize-dequantizes the activations per 16-element block with the input global
scale, which is the arithmetic a Blackwell FP4 tensor core performs.

Fused projections (q/k/v, gate/up) whose shards carry different global scales keep one scale per
shard: each shard's rows are dequantized with their own scale, which is exact (vLLM instead takes the
max and silently changes the weights). Shards whose activation scales differ get their activations
quantized separately for the same reason.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fp4serve.errors import CheckpointError
from fp4serve.formats.checkpoint import COMPRESSED_TENSORS, MODELOPT, ON_THE_FLY
from fp4serve.formats.nvfp4 import (
    BLOCK_SIZE,
    E2M1_MAX,
    E2M1_VALUES,
    E4M3_MAX,
    dequantize_nvfp4,
    quantize_nvfp4,
    unpack_fp4,
)
from fp4serve.kernels.cpu_nvfp4 import nvfp4_linear
from fp4serve.kernels.triton_support import use_triton
from fp4serve.layers.linear import LinearMethod

log = logging.getLogger(__name__)

# checkpoint tensor name -> (our buffer, stored as a divisor?)
_LAYOUT_NAMES = {
    MODELOPT: {
        "weight": ("weight_packed", False),
        "weight_scale": ("weight_scale", False),
        "weight_scale_2": ("weight_global", False),
        "input_scale": ("input_global", False),
        "pre_quant_scale": ("pre_quant_scale", False),
    },
    COMPRESSED_TENSORS: {
        "weight_packed": ("weight_packed", False),
        "weight_scale": ("weight_scale", False),
        "weight_global_scale": ("weight_global", True),
        "input_global_scale": ("input_global", True),
    },
}


def fake_quantize_activations(x: torch.Tensor, input_global: torch.Tensor | None) -> torch.Tensor:
    """x -> dequantize(quantize_nvfp4(x)) per 16-block of the last dim, in x's dtype. Without a
    calibrated input scale the global scale is taken from this call's amax (dynamic)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if input_global is None:
        amax = flat.abs().amax()
        input_global = torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))
    return dequantize_nvfp4(quantize_nvfp4(flat, input_global)).reshape(x.shape).to(x.dtype)


class NVFP4LinearMethod(LinearMethod):
    def __init__(self, source: str, compute: str = "w4a16", input_scales: bool = False, pre_quant_scale: bool = False):
        if source not in (MODELOPT, COMPRESSED_TENSORS, ON_THE_FLY):
            raise ValueError(f"unknown NVFP4 weight source {source!r}")
        if compute not in ("w4a16", "w4a4"):
            raise ValueError(f"unknown NVFP4 compute mode {compute!r}")
        self.source = source
        self.compute = compute
        self.input_scales = input_scales and source != ON_THE_FLY
        self.pre_quant_scale = pre_quant_scale and source == MODELOPT

    # -- parameters -------------------------------------------------------------------------------

    def create_weights(self, layer, dtype, device=None):
        if layer.in_features % BLOCK_SIZE:
            raise CheckpointError(
                f"{layer.prefix}: NVFP4 needs in_features divisible by {BLOCK_SIZE}, got {layer.in_features}"
            )
        shards = len(layer.output_sizes)
        out, cols = layer.out_features, layer.in_features
        layer.register_buffer("weight_packed", torch.zeros(out, cols // 2, dtype=torch.uint8, device=device))
        layer.register_buffer(
            "weight_scale", torch.zeros(out, cols // BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=device)
        )
        layer.register_buffer("weight_global", torch.zeros(shards, dtype=torch.float32, device=device))
        if self.input_scales:
            layer.register_buffer("input_global", torch.zeros(shards, dtype=torch.float32, device=device))
        if self.pre_quant_scale:
            layer.register_buffer("pre_quant_scale", torch.zeros(shards, cols, dtype=dtype, device=device))
        layer.model_dtype = dtype
        layer.shards_loaded = set()

    def tensor_names(self, layer):
        if self.source == ON_THE_FLY:
            return ["weight"]
        names = [name for name, (ours, _) in _LAYOUT_NAMES[self.source].items() if hasattr(layer, ours)]
        return names

    def load(self, layer, name, tensor, shard):
        index = shard or 0
        rows = layer.shard_rows(shard)
        num_rows = rows.stop - rows.start
        if self.source == ON_THE_FLY:
            return self._stage_and_quantize(layer, name, tensor, shard)
        ours, divisor = _LAYOUT_NAMES[self.source].get(name, (None, False))
        if ours is None or not hasattr(layer, ours):
            raise CheckpointError(f"unexpected tensor {layer.prefix}.{name} for an NVFP4 ({self.source}) Linear")
        target = getattr(layer, ours)
        if ours in ("weight_packed", "weight_scale"):
            expected_dtype = torch.uint8 if ours == "weight_packed" else torch.float8_e4m3fn
            expected = (num_rows, target.shape[1])
            if tensor.dtype != expected_dtype or tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"{layer.prefix}.{name} (shard {shard}): {tensor.dtype} {tuple(tensor.shape)}, "
                    f"expected {expected_dtype} {expected} for NVFP4 weights of {layer.in_features} inputs"
                )
            target[rows].copy_(tensor)
        elif ours == "pre_quant_scale":
            if tuple(tensor.shape) != (layer.in_features,):
                raise CheckpointError(
                    f"{layer.prefix}.{name}: shape {tuple(tensor.shape)}, expected ({layer.in_features},)"
                )
            target[index].copy_(tensor)
        else:
            if tensor.numel() != 1:
                raise CheckpointError(
                    f"{layer.prefix}.{name}: a global scale must be one number, got shape {tuple(tensor.shape)}"
                )
            value = tensor.float().reshape(())
            if not (torch.isfinite(value) and value > 0):
                raise CheckpointError(f"{layer.prefix}.{name}: global scale {value.item()} is not a positive number")
            target[index] = 1.0 / value if divisor else value

    def _stage_and_quantize(self, layer, name, tensor, shard):
        if name != "weight":
            raise CheckpointError(f"unexpected tensor {layer.prefix}.{name} for a Linear quantized at load")
        rows = layer.dense_shard_rows(tensor, shard)
        if not hasattr(layer, "staging"):
            # 16-bit copy of the whole fused matrix, freed as soon as its last shard arrives
            layer.staging = torch.empty(
                layer.out_features, layer.in_features, dtype=layer.model_dtype, device=layer.weight_packed.device
            )
        layer.staging[rows].copy_(tensor)
        layer.shards_loaded.add(shard)
        if len(layer.shards_loaded) == len(layer.output_sizes):
            # One global scale for the fused matrix: what ModelOpt exports for fused projections.
            q = quantize_nvfp4(layer.staging)
            layer.weight_packed.copy_(q.packed)
            layer.weight_scale.copy_(q.block_scale)
            layer.weight_global.fill_(q.global_scale.item())
            del layer.staging

    # -- after loading ----------------------------------------------------------------------------

    def process_weights_after_loading(self, layer):
        sizes = torch.tensor(layer.output_sizes, device=layer.weight_global.device)
        layer.row_global = layer.weight_global.repeat_interleave(sizes)  # [out] fp32
        if len(set(layer.weight_global.tolist())) > 1:
            log.info(
                "%s: shards have different weight global scales %s; each shard keeps its own (exact)",
                layer.prefix,
                [f"{g:.3g}" for g in layer.weight_global.tolist()],
            )
        layer.activation_groups = self._activation_groups(layer)
        if len(layer.activation_groups) > 1:
            log.info("%s: shards have different activation scales; their inputs are quantized separately", layer.prefix)

    def _activation_groups(self, layer) -> list[tuple[slice, int]]:
        """Runs of shards that share input transforms: [(output rows, representative shard)]."""

        def key(i):
            parts = []
            if self.input_scales:
                parts.append(layer.input_global[i].item())
            if self.pre_quant_scale:
                parts.append(tuple(layer.pre_quant_scale[i].tolist()))
            return tuple(parts)

        groups: list[tuple[slice, int]] = []
        for i in range(len(layer.output_sizes)):
            rows = layer.shard_rows(i if len(layer.output_sizes) > 1 else None)
            if groups and key(groups[-1][1]) == key(i):
                groups[-1] = (slice(groups[-1][0].start, rows.stop), groups[-1][1])
            else:
                groups.append((rows, i))
        return groups

    def weight_bytes(self, layer):
        buffers = [layer.weight_packed, layer.weight_scale, layer.weight_global]
        return sum(b.numel() * b.element_size() for b in buffers)

    # -- compute ----------------------------------------------------------------------------------

    def dequantized_weight(self, layer, rows: slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight the codes stand for (reference; the fast paths never build it whole)."""
        rows = rows or slice(0, layer.out_features)
        values = E2M1_VALUES.to(layer.weight_packed.device)[unpack_fp4(layer.weight_packed[rows]).to(torch.int32)]
        # the codec's order of operations: code * (block_scale * global), so results match it bit for bit
        scale = layer.weight_scale[rows].float() * layer.row_global[rows, None]
        return (values.unflatten(-1, (-1, BLOCK_SIZE)) * scale.unsqueeze(-1)).flatten(-2).to(dtype)

    def transform_input(self, layer, x: torch.Tensor, shard: int) -> torch.Tensor:
        if self.pre_quant_scale:
            x = x * layer.pre_quant_scale[shard]
        if self.compute == "w4a4":
            x = fake_quantize_activations(x, layer.input_global[shard] if self.input_scales else None)
        return x

    def apply(self, layer, x):
        if use_triton(x):
            # imported here: triton is optional (the `cuda` extra) and never imported where unused
            from fp4serve.kernels.triton_nvfp4 import nvfp4_linear_triton as linear
        else:
            linear = nvfp4_linear
        outputs = []
        for rows, shard in layer.activation_groups:
            xs = self.transform_input(layer, x, shard)
            bias = layer.bias[rows] if layer.bias is not None else None
            # the same weights as dequantized_weight(), decoded tile by tile (kernels/cpu_nvfp4.py or
            # kernels/triton_nvfp4.py)
            outputs.append(
                linear(xs, layer.weight_packed[rows], layer.weight_scale[rows], layer.row_global[rows], bias)
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def reference_apply(self, layer, x):
        """Plain torch: the whole dequantized matrix, then F.linear (what apply() is tested against)."""
        outputs = []
        for rows, shard in layer.activation_groups:
            bias = layer.bias[rows] if layer.bias is not None else None
            xs = self.transform_input(layer, x, shard)
            outputs.append(F.linear(xs, self.dequantized_weight(layer, rows, x.dtype), bias))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
