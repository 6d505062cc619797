"""What every model family shares: the engine-facing contract of docs/architecture.md.

forward(batch) -> hidden states for every scheduled token; compute_logits(rows) -> logits;
load_weights(iter) strict; cache needs declared by layers that have a `cache_spec()`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fp4serve.forward_batch import ForwardBatch
from fp4serve.layers.linear import Linear, PlainLinearMethod
from fp4serve.models.kv_scales import take_kv_scales
from fp4serve.models.weights import LoadPlan, load_weights


class CausalLM(nn.Module):
    # (our fused module suffix, checkpoint module suffix, shard index), e.g. qkv_proj <- q_proj shard 0
    stacked_params: list[tuple[str, str, int]] = []
    # checkpoint-name prefixes rewritten before lookup, e.g. ("model.language_model.", "model.")
    checkpoint_renames: list[tuple[str, str]] = []

    def __init__(self, config, dtype: torch.dtype, drop_mtp: bool = True, mtp_drafting: bool = False):
        super().__init__()
        self.config = config  # the text config (transformers PretrainedConfig)
        self.dtype = dtype
        self.drop_mtp = drop_mtp
        # The MTP drafter loads the checkpoint's mtp.* head itself: the target drops it either way,
        # and its load log says which.
        self.mtp_drafting = mtp_drafting

    def make_lm_head(self) -> None:
        """Tied heads share the embedding matrix, bound at load time; build them on the meta
        device so no vocab x hidden buffer is allocated just to be replaced."""
        config = self.config
        tied = config.tie_word_embeddings
        self.lm_head = Linear(
            config.hidden_size,
            config.vocab_size,
            dtype=self.dtype,
            prefix="lm_head",
            device="meta" if tied else None,
            method=PlainLinearMethod() if tied else None,  # shares the embedding: never quantized on its own
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the given rows of hidden states [N, H] -> [N, V], in the model dtype (the
        sampler works on an fp32 copy; converting here too would copy [N, V] twice per step)."""
        return self.lm_head(hidden)

    def load_plan(self) -> LoadPlan:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        plan = self.load_plan()
        if self.config.tie_word_embeddings:
            plan.dropped.setdefault("lm_head.weight", "tied to embed_tokens")
            plan.tied["lm_head.weight"] = "model.embed_tokens.weight"
        load_weights(self, take_kv_scales(self, weights, plan), plan)
        for module in self.modules():
            if isinstance(module, Linear):
                module.method.process_weights_after_loading(module)

    def cache_layers(self) -> list[nn.Module]:
        """Modules that need engine-allocated cache (attention KV, GDN state), in model order."""
        return [m for m in self.modules() if hasattr(m, "cache_spec")]


def run_decoder(layers: nn.ModuleList, norm: nn.Module, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """The decoder layers, then the final norm, keeping in batch.captures.hidden the output of each
    layer batch.capture_layers names (the last layer's after the norm, as transformers reports it)."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        x = layer(x, batch)
        if i in batch.capture_layers and i != last:
            batch.captures.hidden[i] = x
    x = norm(x)
    if last in batch.capture_layers:
        batch.captures.hidden[last] = x
    return x
