"""Qwen3.5 / 3.6 hybrid decoders, dense and MoE (transformers `qwen3_5`, `qwen3_5_moe`).

`layer_types[i]` picks the token mixer of layer i: `linear_attention` (Gated DeltaNet, layers/gdn.py)
or `full_attention` (gated attention below). All norms are zero-centred, y = x/rms(x) * (1 + w),
except the GDN output norm. The *ForConditionalGeneration checkpoints nest the language model under
`model.language_model.` next to the vision tower `model.visual.` (models/qwen3_5_vision.py), which is
built unless --language-model-only; image embeddings replace the embeddings of the prompt's image
placeholder tokens, and attention takes M-RoPE (t, h, w) positions for them. The MTP head (`mtp.*`:
the MTP drafter, when on, loads it itself) is dropped by name, and logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fp4serve.forward_batch import ForwardBatch
from fp4serve.layers.attention import PagedAttention
from fp4serve.layers.gdn import GatedDeltaNet
from fp4serve.layers.linear import Linear
from fp4serve.layers.moe import GatedMLP, SparseMoeBlock, split_fused_experts
from fp4serve.layers.norm import RMSNorm
from fp4serve.layers.rotary import RotaryEmbedding
from fp4serve.models.base import CausalLM, run_decoder
from fp4serve.models.llama import FUSED
from fp4serve.models.qwen3_5_vision import Qwen3_5VisionEncoder
from fp4serve.models.weights import LoadPlan
from fp4serve.multimodal.inputs import ImageInput

# (our fused Linear, checkpoint module, shard). gate/up also covers the shared expert and every expert.
STACKED = [
    *FUSED,  # attention and MLP, as Llama's
    ("in_proj_qkvz", "in_proj_qkv", 0),
    ("in_proj_qkvz", "in_proj_z", 1),
    ("in_proj_ba", "in_proj_b", 0),
    ("in_proj_ba", "in_proj_a", 1),
]
MROPE_SECTION = [11, 11, 10]  # transformers' default when rope_parameters has none
MIS_NESTED_VISION = "model.language_model.visual.*"


class Qwen3_5Attention(nn.Module):
    """Full attention with an output gate: q_proj yields, per head, head_dim query values followed
    by head_dim gate values; q/k get a per-head zero-centred RMSNorm and partial rotary; the attention
    output is multiplied by sigmoid(gate) before o_proj."""

    def __init__(self, config, dtype: torch.dtype, prefix: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        qkv = [2 * q_size, kv_size, kv_size]  # the query part interleaves query and gate per head
        self.qkv_proj = Linear(config.hidden_size, qkv, bias, dtype, prefix=f"{prefix}.qkv_proj")
        self.o_proj = Linear(q_size, config.hidden_size, bias, dtype, prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, zero_centered=True)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, zero_centered=True)
        rope = config.rope_parameters
        # Text positions give all three mrope sections (t, h, w) the same id, and then the
        # interleaved mrope layout is plain rope over the rotary dims; image tokens differ.
        rotary_dim = int(self.head_dim * rope.get("partial_rotary_factor", 1.0))
        section = rope.get("mrope_section", MROPE_SECTION)
        self.rotary = RotaryEmbedding(self.head_dim, rotary_dim, rope, config.max_position_embeddings, section)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        q_gate, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        q, gate = q_gate.view(T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(k.view(T, self.num_kv_heads, self.head_dim))
        q, k = self.rotary(batch, q, k)
        out = self.attn(q.reshape(T, -1), k.reshape(T, -1), v, batch)
        return self.o_proj(out * torch.sigmoid(gate.reshape(T, -1)))


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, moe: bool, prefix: str):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, zero_centered=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, zero_centered=True)
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(
                config.hidden_size,
                config.linear_num_key_heads,
                config.linear_num_value_heads,
                config.linear_key_head_dim,
                config.linear_value_head_dim,
                config.linear_conv_kernel_dim,
                eps,
                dtype,
                prefix=f"{prefix}.linear_attn",
            )
        elif self.layer_type == "full_attention":
            self.self_attn = Qwen3_5Attention(config, dtype, f"{prefix}.self_attn")
        else:
            raise ValueError(f"layer {layer_idx}: unknown layer type {self.layer_type!r}")
        if moe:
            self.mlp = SparseMoeBlock(
                config.hidden_size,
                config.num_experts,
                config.num_experts_per_tok,
                config.moe_intermediate_size,
                config.shared_expert_intermediate_size,
                # transformers' qwen3_5_moe always renormalizes the top-k weights; honour an explicit config flag
                getattr(config, "norm_topk_prob", True),
                dtype,
                f"{prefix}.mlp",
            )
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.linear_attn(h, batch) if self.layer_type == "linear_attention" else self.self_attn(h, batch)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3_5Model(nn.Module):
    def __init__(self, config, dtype: torch.dtype, moe: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Qwen3_5DecoderLayer(config, i, dtype, moe, f"model.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=True)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        if batch.embed_rows is not None:  # image placeholder rows take the vision tower's embeddings
            x = x.index_copy(0, batch.embed_rows, batch.embed_values.to(x.dtype))
        return run_decoder(self.layers, self.norm, x, batch)


class Qwen3_5ForCausalLM(CausalLM):
    """Dense Qwen3.5. Also takes a multimodal checkpoint's text part, as transformers does."""

    moe = False
    stacked_params = STACKED
    checkpoint_renames = [("model.language_model.", "model.")]

    def __init__(self, config, dtype: torch.dtype, **kwargs):
        super().__init__(config, dtype, **kwargs)
        self.model = Qwen3_5Model(config, dtype, self.moe)
        self.make_lm_head()

    @classmethod
    def decoder_layer(cls, config, index: int, dtype: torch.dtype) -> Qwen3_5DecoderLayer:
        """Decoder layer `index` on its own (`fp4serve quantize` builds and calibrates one at a time)."""
        return Qwen3_5DecoderLayer(config, index, dtype, cls.moe, f"model.layers.{index}")

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def load_plan(self) -> LoadPlan:
        dropped = {
            "model.visual.*": "vision tower: text-only serving",
            # Some hand-converted checkpoints nest the vision tower inside the language model.
            MIS_NESTED_VISION: "vision tower (nested under language_model): text-only serving",
        }
        if self.drop_mtp:
            dropped["mtp.*"] = (
                "MTP head: loaded by the MTP drafter" if self.mtp_drafting else "MTP head: unused, no MTP drafting"
            )
        return LoadPlan(stacked=self.stacked_params, renames=self.checkpoint_renames, dropped=dropped)


class Qwen3_5ForConditionalGeneration(Qwen3_5ForCausalLM):
    """The image-text checkpoint. `config` is its text config (transformers ties lm_head by the
    top-level config's flag, which config.ModelInfo copies into the text config); vision_config
    builds the tower (checkpoint `model.visual.`), None serves the text path only
    (--language-model-only) and drops the tower's tensors."""

    def __init__(self, config, dtype: torch.dtype, vision_config=None, **kwargs):
        super().__init__(config, dtype, **kwargs)
        # at model.visual, the checkpoint's own name, so errors name tensors as the files do
        self.model.visual = Qwen3_5VisionEncoder(vision_config) if vision_config is not None else None

    @property
    def visual(self) -> Qwen3_5VisionEncoder | None:
        return self.model.visual

    def load_plan(self) -> LoadPlan:
        plan = super().load_plan()
        if self.visual is None:
            plan.dropped["model.visual.*"] = plan.dropped[MIS_NESTED_VISION] = "vision tower: --language-model-only"
            return plan
        del plan.dropped["model.visual.*"], plan.dropped[MIS_NESTED_VISION]
        rename = "fp4serve rename-tensors DIR --from model.language_model.visual. --to model.visual."
        plan.refused[MIS_NESTED_VISION] = (
            f"of the vision tower are nested under model.language_model.visual. instead of model.visual.: "
            f"move them with `{rename}` (or serve the text path only with --language-model-only)"
        )
        plan.missing_advice["model.visual.*"] = (
            "the vision tower is incomplete: a checkpoint whose tower was stripped is served with "
            f"--language-model-only; tensors under another prefix can be moved with `{rename}`"
        )
        return plan

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """The language-model embeddings of each image, [num_tokens, hidden] each, in one tower pass."""
        device = self.model.embed_tokens.weight.device
        pixels = torch.cat([image.pixel_values for image in images]).to(device)
        merged = self.visual(pixels, [image.grid for image in images])
        return list(merged.split([self.visual.num_tokens(image.grid) for image in images]))


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    """MoE Qwen3.5/3.6: every layer's MLP is a SparseMoeBlock. Loads both expert layouts: per-expert
    tensors (NVFP4 checkpoints; also what transformers' save_pretrained writes) and fused 3-D tensors
    (transformers' in-memory state dict)."""

    moe = True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(split_fused_experts(weights))


class Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeForCausalLM, Qwen3_5ForConditionalGeneration):
    """The MoE image-text checkpoint: MoE layers and expert loading, and the vision tower."""
