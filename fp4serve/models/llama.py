"""Llama-family decoders: LlamaForCausalLM (SmolLM2), Qwen2ForCausalLM (q/k/v bias),
Qwen3ForCausalLM (per-head q/k RMSNorm). One pre-norm block: attention + SwiGLU MLP."""
from __future__ import annotations

import torch
from torch import nn

from fp4serve.forward_batch import ForwardBatch
from fp4serve.layers.activation import silu_and_mul
from fp4serve.layers.attention import PagedAttention
from fp4serve.layers.linear import Linear
from fp4serve.layers.norm import RMSNorm
from fp4serve.layers.rotary import RotaryEmbedding
from fp4serve.models.base import CausalLM
from fp4serve.models.weights import LoadPlan

FUSED = [("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
         ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]  # fmt: skip


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype, qkv_bias: bool, qk_norm: bool, prefix: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], qkv_bias, dtype, prefix=f"{prefix}.qkv_proj")
        o_bias = bool(getattr(config, "attention_bias", False))  # Qwen2: q/k/v bias only
        self.o_proj = Linear(q_size, config.hidden_size, o_bias, dtype, prefix=f"{prefix}.o_proj")
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(self.head_dim, self.head_dim, config.rope_parameters, config.max_position_embeddings)
        layer_types = getattr(config, "layer_types", None)
        sliding = layer_types is not None and layer_types[layer_idx] == "sliding_attention"
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5,
            sliding_window=config.sliding_window if sliding else None,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size, _ = self.qkv_proj.output_sizes
        v = qkv[:, q_size + kv_size :]
        if self.qk_norm:
            q = self.q_norm(qkv[:, :q_size].view(T, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, q_size : q_size + kv_size].view(T, self.num_kv_heads, self.head_dim))
            q, k = self.rotary(batch, q, k)
        else:  # q and k heads sit side by side in qkv: rotate them in one pass
            qk = self.rotary.rotate(batch, qkv[:, : q_size + kv_size].view(T, -1, self.head_dim))
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        return self.o_proj(self.attn(q.reshape(T, -1), k.reshape(T, -1), v, batch))


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype, prefix: str):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [inter, inter], bias, dtype, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = Linear(inter, config.hidden_size, bias, dtype, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype, qkv_bias: bool, qk_norm: bool, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, dtype, qkv_bias, qk_norm, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, dtype, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config, dtype, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, qkv_bias, qk_norm, f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(x, batch)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    qk_norm = False
    stacked_params = FUSED

    def __init__(self, config, dtype: torch.dtype, **kwargs):
        super().__init__(config, dtype, **kwargs)
        qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.model = LlamaModel(config, dtype, qkv_bias, self.qk_norm)
        self.make_lm_head()

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def load_plan(self) -> LoadPlan:
        return LoadPlan(stacked=self.stacked_params, dropped={"model.rotary_emb.*": "buffers recomputed at load"})


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
