"""The two NVFP4 output layouts `fp4serve quantize` writes (docs/reference.md section 2): tensor names
per quantized Linear, KV-cache scale names, and the quantization config in config.json (plus
ModelOpt's hf_quant_config.json)."""

from __future__ import annotations

import torch

from fp4serve.formats.checkpoint import COMPRESSED_TENSORS, MODELOPT
from fp4serve.formats.nvfp4 import E2M1_MAX, E4M3_MAX, NVFP4Tensor

FORMATS = (COMPRESSED_TENSORS, MODELOPT)
PRODUCER = {"name": "fp4serve", "version": "0.1.0"}
NVFP4_WEIGHTS = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
                 "dynamic": False, "scale_dtype": "float8_e4m3fn"}  # fmt: skip
FP8_KV = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
NVFP4_KV = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


def ct_global(amax: float) -> torch.Tensor:
    """compressed-tensors' global scale, 2688 / amax, computed as its generate_gparam does."""
    amax_t = torch.tensor(amax, dtype=torch.float32).clamp(min=torch.finfo(torch.float32).tiny)
    g = (E4M3_MAX * E2M1_MAX) / amax_t
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def linear_tensors(fmt: str, module: str, q: NVFP4Tensor, amax: float, input_amax: float | None,
                   pre_quant_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """One quantized Linear's tensors. amax: the weight amax its global scale was made from
    (shared by a fused group); input_amax: the calibrated activation amax (W4A4) or None."""
    if fmt == COMPRESSED_TENSORS:
        out = {f"{module}.weight_packed": q.packed, f"{module}.weight_scale": q.block_scale,
               f"{module}.weight_global_scale": ct_global(amax)}  # fmt: skip
        if input_amax is not None:
            out[f"{module}.input_global_scale"] = ct_global(input_amax)
        return out
    out = {f"{module}.weight": q.packed, f"{module}.weight_scale": q.block_scale,
           f"{module}.weight_scale_2": q.global_scale.reshape(()).float().clone()}  # fmt: skip
    if input_amax is not None:
        out[f"{module}.input_scale"] = torch.tensor(max(input_amax, 1e-12) / (E4M3_MAX * E2M1_MAX))
    if pre_quant_scale is not None:
        out[f"{module}.pre_quant_scale"] = pre_quant_scale
    return out


def kv_scale_tensors(fmt: str, attention_module: str, k_amax: float, v_amax: float, kv: str) -> dict:
    """Per-tensor K/V scales in the names vLLM reads (models/kv_scales.py): amax/448 for fp8, the
    NVFP4 global scale amax/(6*448) for nvfp4."""
    divisor = E4M3_MAX if kv == "fp8" else E4M3_MAX * E2M1_MAX
    k, v = (torch.tensor(max(a, 1e-12) / divisor, dtype=torch.float32) for a in (k_amax, v_amax))
    if fmt == COMPRESSED_TENSORS:
        return {f"{attention_module}.k_scale": k, f"{attention_module}.v_scale": v}
    return {f"{attention_module}.k_proj.k_scale": k, f"{attention_module}.v_proj.v_scale": v}


def quantization_configs(fmt: str, ignore: list[str], w4a4: bool, kv: str | None, pre_quant_scale: bool):
    """(config.json quantization_config, hf_quant_config.json or None)."""
    if fmt == COMPRESSED_TENSORS:
        group = {"targets": ["Linear"], "weights": dict(NVFP4_WEIGHTS), "input_activations": None,
                 "output_activations": None, "format": "nvfp4-pack-quantized"}  # fmt: skip
        if w4a4:
            group["input_activations"] = {**NVFP4_WEIGHTS, "dynamic": "local"}
        config = {"quant_method": COMPRESSED_TENSORS, "format": "nvfp4-pack-quantized",
                  "quantization_status": "compressed", "config_groups": {"group_0": group}, "ignore": ignore,
                  "kv_cache_scheme": None if kv is None else dict(FP8_KV if kv == "fp8" else NVFP4_KV)}  # fmt: skip
        return config, None
    algo = "NVFP4_AWQ" if pre_quant_scale else "NVFP4" if w4a4 else "W4A16_NVFP4"
    common = {"quant_algo": algo, "kv_cache_quant_algo": None if kv is None else kv.upper(), "group_size": 16}
    hf_quant = {"producer": PRODUCER, "quantization": {**common, "exclude_modules": ignore}}
    return {"quant_method": MODELOPT, **common, "ignore": ignore}, hf_quant


def prefix_pattern(fmt: str, prefix: str) -> str:
    """One ignore entry for every module under `prefix` (the MTP head, the vision tower)."""
    if fmt == COMPRESSED_TENSORS:
        return "re:^" + prefix.replace(".", r"\.") + ".*"
    return prefix + "*"
