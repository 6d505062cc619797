"""K/V cache scales: the per-layer scales stored in quantized checkpoints, routed to the attention
layers, and the one policy for where a quantized cache's scales come from (`kv_scale_source`).

The names are the ones vLLM reads (model_loader/weight_utils.py, maybe_remap_kv_scale_name):
compressed-tensors puts `k_scale` / `v_scale` on the attention module (`...self_attn.k_scale`),
ModelOpt on the K and V projections (`...self_attn.k_proj.k_scale`, `...self_attn.v_proj.v_scale`),
vLLM's own layout on the inner attention (`...self_attn.attn.k_scale`), and older exports carry one
`...self_attn.kv_scale` for both. Each is a per-tensor scale, amax/448 in vLLM's fp8 meaning; for
an nvfp4 cache it serves as the global scale. A scale whose module is not an attention layer is
passed on, and the strict loader reports it as unexpected.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fp4serve.errors import CheckpointError
from fp4serve.formats.kv_codec import KVCacheFormat
from fp4serve.layers.attention import PagedAttention
from fp4serve.models.weights import LoadPlan

log = logging.getLogger(__name__)

# checkpoint suffix -> which scales it fills; longest first so `.k_proj.k_scale` wins over `.k_scale`
SUFFIXES = (
    (".k_proj.k_scale", "k"),
    (".v_proj.v_scale", "v"),
    (".k_scale", "k"),
    (".v_scale", "v"),
    (".kv_scale", "kv"),
)


def _attention_layer(modules: dict[str, nn.Module], path: str) -> PagedAttention | None:
    for candidate in (path, path + ".attn"):
        if isinstance(modules.get(candidate), PagedAttention):
            return modules[candidate]
    return None


def take_kv_scales(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], plan: LoadPlan
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields every tensor but the K/V cache scales, which it loads into the attention layers."""
    modules = dict(model.named_modules())
    for ckpt_name, tensor in weights:
        suffix = next(((s, w) for s, w in SUFFIXES if ckpt_name.endswith(s)), None)
        dropped = any(fnmatch.fnmatchcase(ckpt_name, p) for p in plan.dropped)
        name = next((new + ckpt_name[len(old) :] for old, new in plan.renames if ckpt_name.startswith(old)), ckpt_name)
        layer = _attention_layer(modules, name[: -len(suffix[0])]) if suffix and not dropped else None
        if layer is None:
            yield ckpt_name, tensor
            continue
        if tensor.numel() != 1:
            raise CheckpointError(
                f"{ckpt_name}: a per-tensor KV cache scale has one element, this one has shape {tuple(tensor.shape)}"
            )
        value = tensor.float().reshape(())
        if not (torch.isfinite(value) and value > 0):
            raise CheckpointError(f"{ckpt_name}: a KV cache scale must be finite and positive, got {value.item()}")
        for which in suffix[1]:
            if which in layer.loaded_scales:
                raise CheckpointError(f"{ckpt_name}: the {which}_scale of this attention layer appears twice")
            layer.load_kv_scale(which, value)


def kv_scale_source(layers, kv_format: KVCacheFormat, calculate: bool) -> str:
    """Where each attention layer's k_scale / v_scale come from, in words for the start log (and
    warnings for missing ones): --calculate-kv-scales (amax of the first forward, which the runner
    asks for) over the checkpoint's tensors over 1.0. A 16/32-bit cache uses no scales."""
    kv_layers = [m for m in layers if isinstance(m, PagedAttention)]
    loaded = sum(m.loaded_scales == {"k", "v"} for m in kv_layers)
    if not kv_format.quantized:
        return "none" + (f" (the checkpoint's k/v scales of {loaded} layers are unused)" if loaded else "")
    if calculate:
        rule = "amax/448" if kv_format.name == "fp8_e4m3" else "amax/(6*448)"
        overrides = f"; overrides the checkpoint's scales of {loaded} layers" if loaded else ""
        return f"calibrated per layer on the first prefill ({rule}, --calculate-kv-scales{overrides})"
    partial = [m for m in kv_layers if m.loaded_scales and m.loaded_scales != {"k", "v"}]
    if partial:
        log.warning(
            "%d attention layers have only one of k_scale/v_scale in the checkpoint; the other is 1.0", len(partial)
        )
    if loaded == len(kv_layers):
        return f"from the checkpoint ({loaded} layers)"
    if kv_format.name == "fp8_e4m3":
        log.warning(
            "fp8 KV cache: %d of %d attention layers have no k_scale/v_scale in the checkpoint and use 1.0 "
            "(|values| beyond 448 saturate); --calculate-kv-scales calibrates them on the first prefill",
            len(kv_layers) - loaded,
            len(kv_layers),
        )
    what = "1.0" if kv_format.name == "fp8_e4m3" else "global scale 1.0 (the per-16 E4M3 block scales carry the range)"
    return f"{what} for {len(kv_layers) - loaded} layers" + (f", from the checkpoint for {loaded}" if loaded else "")
