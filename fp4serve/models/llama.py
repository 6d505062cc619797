"""Llama-family decoders: LlamaForCausalLM (SmolLM2), Qwen2ForCausalLM (q/k/v bias),
Qwen3ForCausalLM (per-head q/k RMSNorm). One pre-norm block: attention + SwiGLU MLP.

On CPU, steps of few tokens (decode, speculative verification) of layers the fused C step supports
(kernels/cpu_decode.py: no q/k norm, no sliding window, a 16/32-bit KV cache, NVFP4 W4A16 or
readable dense weights) run every layer in one call; the modules below are its reference and run
everything else."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fp4serve.forward_batch import ForwardBatch
from fp4serve.kernels import cpu_decode
from fp4serve.kernels.triton_support import use_triton
from fp4serve.layers.activation import silu_and_mul
from fp4serve.layers.attention import PagedAttention
from fp4serve.layers.linear import Linear, PlainLinearMethod
from fp4serve.layers.norm import RMSNorm
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod
from fp4serve.layers.packed_linear import PackedCPULinearMethod
from fp4serve.layers.rotary import RotaryEmbedding
from fp4serve.models.base import CausalLM, run_decoder
from fp4serve.models.weights import LoadPlan

log = logging.getLogger(__name__)

# Tokens per step up to which the fused step beats the per-layer path (SmolLM2 bf16, Zen 4 avx512_bf16:
# 21 vs 34 ms at 4 rows, 39 vs 36 at 8): NVFP4 rows share the C GEMV either way; dense fp32/bf16
# rows lose to oneDNN's GEMM beyond a few.
FUSED_MAX_ROWS = {"nvfp4": 32, "dense": 6}

FUSED = [
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype, qkv_bias: bool, qk_norm: bool, prefix: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size, [q_size, kv_size, kv_size], qkv_bias, dtype, prefix=f"{prefix}.qkv_proj"
        )
        o_bias = bool(getattr(config, "attention_bias", False))  # Qwen2: q/k/v bias only
        self.o_proj = Linear(q_size, config.hidden_size, o_bias, dtype, prefix=f"{prefix}.o_proj")
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            self.head_dim, self.head_dim, config.rope_parameters, config.max_position_embeddings
        )
        layer_types = getattr(config, "layer_types", None)
        sliding = layer_types is not None and layer_types[layer_idx] == "sliding_attention"
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            sliding_window=config.sliding_window if sliding else None,
        )

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
        fused = self.fused_decoder(batch)
        if fused is not None:
            cos, sin = self.layers[0].self_attn.rotary.cos_sin(batch.positions, torch.float32)
            if batch.decode_only:
                tables, context = batch.block_tables, batch.context_lens
            else:  # each row attends causally: to its sequence's context up to its own position
                lens = torch.tensor(batch.query_lens, device=x.device)
                tables, context = batch.block_tables.repeat_interleave(lens, dim=0), batch.positions + 1
            return self.norm(fused(x, batch.slot_mapping, tables, context, cos, sin).to(x.dtype))
        return run_decoder(self.layers, self.norm, x, batch)

    def fused_decoder(self, batch: ForwardBatch) -> cpu_decode.FusedDecoder | None:
        """The fused C step for a batch of few tokens (decode, speculative verification, short
        chunks), or None (the per-layer path runs). Built on the first such step, once the engine
        has bound the caches, and again if they are rebound."""
        if batch.num_tokens > FUSED_MAX_ROWS["nvfp4"] or batch.input_ids.device.type != "cpu":
            return None
        if use_triton(batch.input_ids):  # FP4SERVE_TRITON=1 on CPU: the per-layer Triton path, under test
            return None
        if batch.capture_layers or batch.calibrate_kv_scales:
            return None  # a drafter's taps on layer outputs, or KV-scale calibration: the per-layer path
        caches = [t for layer in self.layers for t in (layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache)]
        if any(t is None for t in caches):
            return None  # not bound yet: decide once they are
        plan = getattr(self, "_fused", None)
        if plan is None or (
            plan.decoder is not None and plan.decoder.cache_pointers != tuple(t.data_ptr() for t in caches)
        ):
            plan = self._fused = FusedPlan.build(self)
        if plan.decoder is None or batch.num_tokens > plan.max_rows:
            return None
        return plan.decoder


def _weight_tensors(linear: Linear) -> tuple[cpu_decode.WeightTensors | None, str]:
    """(tensors, 'nvfp4' or 'dense') of a Linear the fused step reads, or (None, why not)."""
    method = linear.method
    if isinstance(method, NVFP4LinearMethod):
        if method.compute != "w4a16" or method.pre_quant_scale or len(linear.activation_groups) > 1:
            return None, f"{linear.prefix}: NVFP4 with activation transforms"
        w = cpu_decode.WeightTensors(
            packed=linear.weight_packed,
            block_scales=linear.weight_scale,
            row_global=linear.row_global,
            bias=linear.bias,
        )
        return w, "nvfp4"
    if type(method) is PlainLinearMethod or (isinstance(method, PackedCPULinearMethod) and hasattr(linear, "weight")):
        w = cpu_decode.WeightTensors(dense=linear.weight.detach(), bias=linear.bias)
        return (
            (w, "dense") if cpu_decode.supported_weight(w) else (None, f"{linear.prefix}: {linear.weight.dtype} weight")
        )
    return None, f"{linear.prefix}: {type(method).__name__} weights"


class FusedPlan:
    """Whether steps of few tokens run fused, and the decoder when they do."""

    def __init__(self, decoder: cpu_decode.FusedDecoder | None, max_rows: int):
        self.decoder, self.max_rows = decoder, max_rows

    @classmethod
    def build(cls, model: LlamaModel) -> FusedPlan:
        reason = cls._unsupported(model)
        if reason is None:
            layers, kinds = [], set()
            for layer in model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                parts = [_weight_tensors(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
                missing = next((why for w, why in parts if w is None), None)
                if missing:
                    reason = missing
                    break
                kinds.update(kind for _, kind in parts)
                layers.append(
                    cpu_decode.LayerTensors(
                        *(w for w, _ in parts),
                        layer.input_layernorm.weight,
                        layer.post_attention_layernorm.weight,
                        attn.attn.k_cache,
                        attn.attn.v_cache,
                    )
                )
        if reason is not None:
            log.info("CPU steps run layer by layer in torch (fused C step off: %s)", reason)
            return cls(None, 0)
        first = model.layers[0]
        attn = first.self_attn
        decoder = cpu_decode.FusedDecoder(
            layers,
            first.input_layernorm.weight.shape[0],
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            first.mlp.down_proj.in_features,
            attn.attn.k_cache.shape[1],
            first.input_layernorm.eps,
            attn.attn.scale,
        )
        max_rows = min(FUSED_MAX_ROWS[kind] for kind in kinds)
        log.info("CPU steps of up to %d tokens run fused in C (%s weights)", max_rows, "/".join(sorted(kinds)))
        return cls(decoder, max_rows)

    @staticmethod
    def _unsupported(model: LlamaModel) -> str | None:
        if not cpu_decode.c_decode_enabled():
            return f"{cpu_decode.ENV_VAR}=torch"
        if cpu_decode.cpu_library() is None:
            return "no C kernels"
        for layer in model.layers:
            attn = layer.self_attn
            if attn.qk_norm or attn.attn.sliding_window is not None or attn.rotary.rotary_dim != attn.head_dim:
                return "q/k norm, sliding window or partial rotary"
            if attn.attn.kv.format.quantized or attn.attn.k_cache.dtype not in (torch.float32, torch.bfloat16):
                return "the KV cache format"
            if attn.attn.k_cache.device.type != "cpu":
                return "a non-CPU cache"
        return None


def qkv_bias_of(config) -> bool:
    return bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"


class LlamaForCausalLM(CausalLM):
    qk_norm = False
    stacked_params = FUSED
    fused_cpu_decode = True  # the loader keeps plain weights beside oneDNN-packed ones for it

    def __init__(self, config, dtype: torch.dtype, **kwargs):
        super().__init__(config, dtype, **kwargs)
        self.model = LlamaModel(config, dtype, qkv_bias_of(config), self.qk_norm)
        self.make_lm_head()

    @classmethod
    def decoder_layer(cls, config, index: int, dtype: torch.dtype) -> LlamaDecoderLayer:
        """Decoder layer `index` on its own (`fp4serve quantize` builds and calibrates one at a time)."""
        return LlamaDecoderLayer(config, index, dtype, qkv_bias_of(config), cls.qk_norm, f"model.layers.{index}")

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def load_plan(self) -> LoadPlan:
        return LoadPlan(stacked=self.stacked_params, dropped={"model.rotary_emb.*": "buffers recomputed at load"})


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
