"""A 16-bit source checkpoint read one decoder layer at a time: its tensors by layer, and each layer
built as fp4serve's own module (the code that serves the model), in float32, with its weights.

Only one layer's tensors are ever in memory, so a model larger than RAM can be quantized."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from fp4serve.config import ModelInfo
from fp4serve.errors import CheckpointError, ConfigError
from fp4serve.layers.linear import Linear
from fp4serve.layers.moe import split_fused_experts
from fp4serve.models.quantization import checkpoint_module_names
from fp4serve.models.registry import model_class
from fp4serve.models.weights import LoadPlan, load_weights
from fp4serve.toolkit.checkpoint_dir import CheckpointDir

LAYER_NAME = re.compile(r"^(model\.(?:language_model\.)?layers)\.(\d+)\.")


@dataclass
class LinearShard:
    """One checkpoint Linear that is (part of) one of our fused Linears."""

    module: str  # checkpoint module name, the source's spelling
    linear: Linear
    shard: int | None  # None when the Linear is not fused
    rows: slice


class SourceModel:
    def __init__(self, path):
        self.info = ModelInfo.load(path)
        if self.info.quant is not None:
            raise ConfigError(f"{path} is already quantized ({self.info.quant.method}); quantize a 16-bit checkpoint")
        self.cls = model_class(self.info.architectures)
        if not hasattr(self.cls, "decoder_layer"):
            raise ConfigError(f"{self.cls.__name__} cannot be quantized layer by layer")
        self.config = self.info.text_config
        self.ckpt = CheckpointDir.open(path)
        self.layer_tensors: dict[int, list[str]] = {}
        self.prefix = None  # "model.layers" or "model.language_model.layers", as the source writes it
        for name in self.ckpt.where:
            m = LAYER_NAME.match(name)
            if m:
                self.layer_tensors.setdefault(int(m.group(2)), []).append(name)
                self.prefix = self.prefix or m.group(1)
        self.num_layers = self.config.num_hidden_layers
        missing = [i for i in range(self.num_layers) if i not in self.layer_tensors]
        if missing:
            raise CheckpointError(f"{path}: no tensors for decoder layers {missing}")
        fused_experts = [n for n in self.ckpt.where if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
        if fused_experts:
            raise CheckpointError(
                f"{path}: experts stored as fused 3-D tensors ({fused_experts[0]}, ...); save the model with "
                "per-expert tensor names (the hub layout) first"
            )
        self.other_tensors = sorted(n for n in self.ckpt.where if not LAYER_NAME.match(n))

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors as stored (bit-exact), one open file at a time."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.ckpt.where[name], []).append(name)
        for file, file_names in by_file.items():
            with safe_open(str(self.ckpt.path / file), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def source_name(self, ours: str) -> str:
        """Our `model.layers.` spelling -> the source's."""
        return self.prefix + ours[len("model.layers") :] if ours.startswith("model.layers") else ours

    def embedding_name(self) -> str:
        base = self.prefix.rpartition(".")[0]  # model or model.language_model
        return f"{base}.embed_tokens.weight"

    def build_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Decoder layer `index` in float32 with the source's weights, checked strictly."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            layer = self.cls.decoder_layer(self.config, index, torch.float32)
        finally:
            torch.set_default_dtype(previous)
        holder = nn.Module()
        holder.model = nn.Module()
        holder.model.layers = nn.ModuleDict({str(index): layer})
        plan = LoadPlan(stacked=self.cls.stacked_params, renames=self.cls.checkpoint_renames)
        load_weights(holder, split_fused_experts(tensors.items()), plan)
        return layer.eval()

    def linear_shards(self, layer: nn.Module) -> dict[Linear, list[LinearShard]]:
        """Every Linear of a built layer -> the checkpoint modules of its shards."""
        out = {}
        for module in layer.modules():
            if not isinstance(module, Linear):
                continue
            fused = len(module.output_sizes) > 1
            forms = checkpoint_module_names(
                module.prefix, len(module.output_sizes), self.cls.stacked_params, self.cls.checkpoint_renames
            )
            out[module] = [
                LinearShard(
                    self.source_name(names[0]), module, i if fused else None, module.shard_rows(i if fused else None)
                )
                for i, names in enumerate(forms)
            ]
        return out
