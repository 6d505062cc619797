"""Build a model from a directory: class from the registry, strict weight load."""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from fp4serve.config import ModelInfo
from fp4serve.formats.checkpoint import ON_THE_FLY, QuantConfig
from fp4serve.formats.safetensors_io import iter_tensors, tensor_names
from fp4serve.kernels.cpu_decode import c_decode_enabled
from fp4serve.layers.linear import Linear, PlainLinearMethod, linear_methods
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod
from fp4serve.layers.packed_linear import pack_model_linears, packing_available
from fp4serve.models.quantization import LinearMethodChooser
from fp4serve.models.registry import model_class

log = logging.getLogger(__name__)


def load_model(
    info: ModelInfo,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantConfig | None = None,
    nvfp4_compute: str = "w4a16",
    nvfp4_lm_head: bool = False,
    mtp_drafting: bool = False,
    vision: bool = False,
):
    """quant: the resolved quantization (the checkpoint's, or on-the-fly nvfp4); None: plain weights.
    nvfp4_lm_head: quantize a 16-bit lm_head to NVFP4 W4A16 after loading (see quantize_lm_head).
    mtp_drafting: the MTP drafter will load this checkpoint's mtp.* head (the target still drops it).
    vision: build an image-text model's vision tower (from info.hf_config.vision_config)."""
    cls = model_class(info.architectures)
    start = time.perf_counter()
    chooser = LinearMethodChooser(quant, cls.stacked_params, cls.checkpoint_renames, nvfp4_compute) if quant else None
    # Parameters a layer creates without an explicit dtype (norm weights, ...) take the model
    # dtype, as in transformers; buffers made with explicit fp32 (rotary inv_freq) stay fp32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), linear_methods(chooser) if chooser else contextlib.nullcontext():
            tower = {"vision_config": info.hf_config.vision_config} if vision else {}
            model = cls(info.text_config, dtype, mtp_drafting=mtp_drafting, **tower)
    finally:
        torch.set_default_dtype(previous)
    if chooser:
        chooser.report(present_modules(info, model, cls.checkpoint_renames))
    model.load_weights(iter_tensors(info.path))
    model.eval()
    if nvfp4_lm_head:
        quantize_lm_head(model, dtype)
    if quant or nvfp4_lm_head:
        log_weight_bytes(model, dtype)
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.out_features * m.in_features for m in model.modules() if isinstance(m, Linear) and hasattr(m, "weight_packed")
    )  # NVFP4 weights are buffers of packed codes; count the weights they stand for
    if packing_available(dtype, device):
        # Models with a fused C decode step read the plain weights of their layers in small batches
        # and the packed ones in large batches and prefill: both are kept (not for the lm_head,
        # which stays in torch).
        fused = getattr(model, "fused_cpu_decode", False) and c_decode_enabled()
        packed, kept = pack_model_linears(model, lambda name: fused and name != "lm_head")
        log.info(
            "packed %d bf16 Linear weights for oneDNN%s",
            packed,
            f"; kept the plain weights of {kept} for the fused decode step" if kept else "",
        )
    log.info(
        "loaded %s (%s, %.1fM parameters, %s) in %.1f s",
        info.path.name,
        cls.__name__,
        params / 1e6,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return model


def present_modules(info: ModelInfo, model, renames: list[tuple[str, str]]) -> set[str]:
    """Module names in the checkpoint's spelling: those of its tensors, and those of the built model
    (a tied lm_head has no tensor of its own). What quantization ignore entries are checked against."""
    names = {tensor.rpartition(".")[0] for tensor in tensor_names(info.path)}
    for name, _ in model.named_modules():
        names.add(name)
        names.update(old + name[len(new) :] for old, new in renames if name.startswith(new))
    return names


def quantize_lm_head(model, dtype: torch.dtype) -> None:
    """The output projection in NVFP4 (one global scale, W4A16), from its 16-bit weight (for a
    tied head, the embedding table, which stays as it is for the lookups). In a 4-bit model the
    16-bit head is the largest single read of a decode step: SmolLM2-135M's 28M-parameter head is
    57 MB in bf16 against 57 MB for all other Linears in NVFP4 (docs/benchmarks.md has its cost
    in KL and top-1)."""
    head = model.lm_head
    if type(head.method) is not PlainLinearMethod:
        log.info("--nvfp4-lm-head: the lm_head is already %s; left as it is", type(head.method).__name__)
        return
    weight = head.weight.detach()
    quantized = Linear(
        head.in_features,
        head.out_features,
        head.bias is not None,
        dtype,
        method=NVFP4LinearMethod(ON_THE_FLY, "w4a16"),
        prefix=head.prefix,
        device=weight.device,
    )
    quantized.load("weight", weight)
    if head.bias is not None:
        quantized.load("bias", head.bias.detach())
    quantized.method.process_weights_after_loading(quantized)
    model.lm_head = quantized
    log.info(
        "lm_head quantized to NVFP4 (--nvfp4-lm-head): %.1f MiB instead of %.1f MiB",
        quantized.method.weight_bytes(quantized) / 2**20,
        weight.numel() * weight.element_size() / 2**20,
    )


def log_weight_bytes(model, dtype: torch.dtype) -> None:
    """Linear weight memory as held, next to what the same layers take in the model dtype."""
    held = dense = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.method.__class__ is not PlainLinearMethod:
            held += module.method.weight_bytes(module)
            dense += module.out_features * module.in_features * dtype.itemsize
    log.info(
        "NVFP4 Linear weights: %.1f MiB in memory (%.1f MiB in %s; %.2fx smaller)",
        held / 2**20,
        dense / 2**20,
        str(dtype).removeprefix("torch."),
        dense / held if held else 0.0,
    )
