"""`architectures` in config.json -> model class."""
from __future__ import annotations

import importlib

from fp4serve.errors import UnsupportedModelError

_REGISTRY = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "Qwen3_5ForCausalLM": ("qwen3_5", "Qwen3_5ForCausalLM"),
    "Qwen3_5ForConditionalGeneration": ("qwen3_5", "Qwen3_5ForConditionalGeneration"),
    "Qwen3_5MoeForCausalLM": ("qwen3_5", "Qwen3_5MoeForCausalLM"),
    "Qwen3_5MoeForConditionalGeneration": ("qwen3_5", "Qwen3_5MoeForConditionalGeneration"),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class(architectures: list[str] | None):
    for arch in architectures or []:
        if arch in _REGISTRY:
            module, name = _REGISTRY[arch]
            return getattr(importlib.import_module(f"fp4serve.models.{module}"), name)
    raise UnsupportedModelError(
        f"architectures {architectures} not supported; supported: {', '.join(supported_architectures())}"
    )
