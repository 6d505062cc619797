"""Build a model from a directory: class from the registry, strict weight load."""
from __future__ import annotations

import logging
import time

import torch

from fp4serve.config import ModelInfo
from fp4serve.formats.safetensors_io import iter_tensors
from fp4serve.kernels.cpu_linear import pack_model_linears, packing_available
from fp4serve.models.registry import model_class

log = logging.getLogger(__name__)


def load_model(info: ModelInfo, dtype: torch.dtype, device: torch.device):
    cls = model_class(info.architectures)
    start = time.perf_counter()
    # Parameters a layer creates without an explicit dtype (norm weights, ...) take the model
    # dtype, as in transformers; buffers made with explicit fp32 (rotary inv_freq) stay fp32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(info.text_config, dtype)
    finally:
        torch.set_default_dtype(previous)
    model.load_weights(iter_tensors(info.path))
    model.eval()
    if packing_available(dtype, device):
        log.info("packed %d bf16 Linear weights for oneDNN", pack_model_linears(model))
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s (%s, %.1fM parameters, %s) in %.1f s",
        info.path.name, cls.__name__, params / 1e6, str(dtype).removeprefix("torch."), time.perf_counter() - start,
    )  # fmt: skip
    return model
