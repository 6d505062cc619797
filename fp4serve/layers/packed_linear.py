"""bf16 Linear on CPU through oneDNN with the weight pre-packed into its blocked layout.

F.linear on CPU re-lays out the weight on every call; packing once at load makes the decode-size
matmuls (a few rows against a whole weight matrix, bandwidth bound) 1.5-1.9x faster on AVX-512
machines. Numerically it is the same oneDNN bf16 GEMM (tests/unit/test_packed_linear.py). oneDNN packs bf16
only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT: elsewhere (AVX2) the plain method stays."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from fp4serve.kernels.cpu_features import cpu_features
from fp4serve.layers.linear import Linear, LinearMethod, PlainLinearMethod

log = logging.getLogger(__name__)

# Row count oneDNN tunes the packed layout for; any row count works with it.
PACK_BATCH_HINT = 32


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Only where oneDNN supports bf16 reorders on this CPU (torch raises otherwise)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and cpu_features().onednn_bf16_packing
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedCPULinearMethod(LinearMethod):
    """Replaces PlainLinearMethod after loading; holds only the packed weight."""

    def apply(self, layer, x):
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, layer.bias, "none", [], "")

    def weight_bytes(self, layer):
        return layer.packed_weight.numel() * layer.packed_weight.element_size()


def pack_linear(layer: Linear, keep_plain: bool = False) -> None:
    """keep_plain: keep the plain weight too, for code that reads it directly (the fused C decode
    step of models/llama.py), at the cost of a second copy."""
    layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PACK_BATCH_HINT)
    if not keep_plain:
        # The unpacked weight may be shared (a tied lm_head is the embedding table): drop only our reference.
        del layer.weight
    layer.method = PackedCPULinearMethod()


def pack_model_linears(model: nn.Module, keep_plain: Callable[[str], bool] = lambda name: False) -> tuple[int, int]:
    """Pack every plain bf16 Linear of a loaded model; keep_plain(name) says which also keep their
    plain weight. Returns (packed, kept plain)."""
    packed = kept = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and type(module.method) is PlainLinearMethod:
            keep = keep_plain(name)
            pack_linear(module, keep)
            packed, kept = packed + 1, kept + keep
    return packed, kept
