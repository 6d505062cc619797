"""DFlash block drafter (z-lab `DFlashDraftModel`, arXiv 2602.06036; docs/reference.md s.6).

A few Qwen3-style decoder layers with no embedding or lm_head of their own (the target's are shared).
Context: the target's hidden states after decoder layers `target_layer_ids` (transformers'
hidden_states[id + 1]: the residual stream; after the final norm for the last layer), concatenated
-> fc -> hidden_norm = c_t.
Every layer projects c_t with its own k_proj/v_proj (+ k_norm, rope at position t): the context K/V,
stored in the drafter's paged KV cache at the target's KV slots, for committed positions only.
A block, per sequence with P committed-and-computed tokens: ids [token_P, MASK x (B-1)] at positions
P .. P+B-1, embedded by the target's embedding (times dflash_config.input_embedding_scale, default 1).
Queries, and the block's own K/V, come from the block rows (after input_layernorm); each layer
attends over the cached context [0, P) plus the block, NON-causally within the block (a
`sliding_attention` layer is causal with its window, unless the config sets `is_causal`, which
then holds for every layer; a non-causal window is two-sided, as z-lab).
Block K/V are never stored, so a rejected draft leaves nothing behind; context written at positions
past the committed length is overwritten before it is read (reads stop at P). Mask slot c (1..B-1)
predicts the token at its own position P + c: argmax(lm_head(norm(h)) * output_multiplier, softcap).

Use (the engine allocates the KV of `cache_layers()` from the same pool and block tables as the
target; the target's forward keeps the layer outputs its batch's capture_layers names):
    drafter = DFlashDraftModel.load(drafter_dir, target, dtype)
    batch = build_batch(seqs, block_size, capture_layers=tuple(drafter.target_layer_ids))
    hidden = target(batch); feats = target_features(batch.captures, drafter.target_layer_ids)  # [T, n*H]
    drafter.write_context(feats[rows], batch.positions[rows], batch.slot_mapping[rows])  # committed rows
    drafts = drafter.propose(last_tokens, num_committed, block_tables)        # [N, B-1]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.errors import CheckpointError, ConfigError, UnsupportedModelError
from fp4serve.formats.safetensors_io import iter_tensors
from fp4serve.forward_batch import StepCaptures
from fp4serve.layers.cache_spec import KVCacheSpec
from fp4serve.layers.linear import Linear
from fp4serve.layers.norm import RMSNorm
from fp4serve.layers.packed_linear import pack_model_linears, packing_available
from fp4serve.layers.rotary import RotaryEmbedding, rotate_half
from fp4serve.models.llama import LlamaMLP, head_dim_of
from fp4serve.models.mtp import TargetModules, built_like, finish_linears
from fp4serve.models.weights import LoadPlan, load_weights

STACKED = [
    ("kv_proj", "k_proj", 0),
    ("kv_proj", "v_proj", 1),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


def draft_value(config, name: str, default=None):
    """z-lab reads drafter settings from `dflash_config` first, then the top level."""
    return (getattr(config, "dflash_config", None) or {}).get(name, getattr(config, name, default))


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's spread when a config names none: round(1 + i * (L - 4) / (n - 1)); L // 2 for n = 1."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [round(1 + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def block_attention(q, k_block, v_block, k_cache, v_cache, block_tables, context_lens, scale, causal, window):
    """q/k_block/v_block [N, B, heads, D] -> [N, B, H, D]. Sequence i's block sits at positions
    context_lens[i] + (0..B-1) and sees its cached context [0, context_lens[i]) plus the block."""
    N, B = q.shape[:2]
    max_ctx = int(context_lens.max())
    num_blocks = -(-max_ctx // k_cache.shape[1])
    blocks = block_tables[:, :num_blocks]
    k_ctx = k_cache[blocks].flatten(1, 2)[:, :max_ctx].to(q.dtype)  # [N, max_ctx, Hkv, D], padded
    v_ctx = v_cache[blocks].flatten(1, 2)[:, :max_ctx].to(q.dtype)
    keys, values = torch.cat([k_ctx, k_block], dim=1), torch.cat([v_ctx, v_block], dim=1)
    dev = q.device
    ctx_pos = torch.arange(max_ctx, device=dev).expand(N, -1)
    q_pos = context_lens[:, None] + torch.arange(B, device=dev)  # [N, B]
    k_pos = torch.cat([ctx_pos, q_pos], dim=1)
    valid = torch.cat([ctx_pos < context_lens[:, None], torch.ones(N, B, dtype=torch.bool, device=dev)], dim=1)
    offset = q_pos[:, :, None] - k_pos[:, None, :]  # query position - key position
    mask = valid[:, None, :].expand(N, B, -1)
    if causal:
        mask = mask & (offset >= 0)
    if window is not None:
        mask = mask & (offset < window)
        if not causal:
            mask = mask & (-offset < window)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


class DFlashAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, prefix: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(config.attention_bias)
        self.q_proj = Linear(config.hidden_size, q_size, bias, dtype, prefix=f"{prefix}.q_proj")
        # k/v project both the context features and the block rows: one fused Linear
        self.kv_proj = Linear(config.hidden_size, [kv_size, kv_size], bias, dtype, prefix=f"{prefix}.kv_proj")
        self.o_proj = Linear(q_size, config.hidden_size, bias, dtype, prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        rope, max_position = config.rope_parameters, config.max_position_embeddings
        self.rotary = RotaryEmbedding(self.head_dim, self.head_dim, rope, max_position)
        layer_type = (config.layer_types or ["full_attention"] * config.num_hidden_layers)[layer_idx]
        is_causal = getattr(config, "is_causal", None)
        self.causal = layer_type == "sliding_attention" if is_causal is None else bool(is_causal)
        self.sliding_window = config.sliding_window if layer_type == "sliding_attention" else None
        self.scale = self.head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # bound by the engine: [num_blocks, block_size, Hkv, D]
        self.v_cache: torch.Tensor | None = None

    def cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_kv_heads, self.head_dim)

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(positions.reshape(-1), x.dtype)
        cos, sin = cos.view(*positions.shape, 1, -1), sin.view(*positions.shape, 1, -1)
        return x * cos + rotate_half(x) * sin

    def _kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_proj(x).split(self.kv_proj.output_sizes, dim=-1)
        k = self.k_norm(k.unflatten(-1, (self.num_kv_heads, self.head_dim)))
        return self._rope(k, positions), v.unflatten(-1, (self.num_kv_heads, self.head_dim))

    def write_context(self, context: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """context [T, H] (hidden_norm(fc(features))) -> this layer's K/V at KV slots [T]."""
        k, v = self._kv(context, positions)
        self.k_cache.view(-1, *self.k_cache.shape[2:]).index_copy_(0, slots, k.to(self.k_cache.dtype))
        self.v_cache.view(-1, *self.v_cache.shape[2:]).index_copy_(0, slots, v.to(self.v_cache.dtype))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, block_tables, context_lens) -> torch.Tensor:
        """x [N, B, H] block rows at positions [N, B] -> [N, B, H]."""
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)))
        q = self._rope(q, positions)
        k, v = self._kv(x, positions)
        cache, mask = (self.k_cache, self.v_cache), (self.scale, self.causal, self.sliding_window)
        out = block_attention(q, k, v, *cache, block_tables, context_lens, *mask)
        return self.o_proj(out.flatten(-2))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DFlashAttention(config, layer_idx, dtype, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, dtype, f"{prefix}.mlp")

    def forward(self, x, positions, block_tables, context_lens) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, block_tables, context_lens)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraftModel(nn.Module):
    def __init__(self, config, target, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.target = TargetModules(target.model.embed_tokens, target.lm_head)
        self.block_size = int(draft_value(config, "block_size", 16))
        self.mask_token_id = draft_value(config, "mask_token_id")
        layer_ids = draft_value(config, "target_layer_ids")
        num_target_layers = int(draft_value(config, "num_target_layers") or target.config.num_hidden_layers)
        self.target_layer_ids = list(layer_ids or default_target_layer_ids(num_target_layers, config.num_hidden_layers))
        self.embedding_scale = float(draft_value(config, "input_embedding_scale", 1.0))
        self.output_multiplier = float(draft_value(config, "output_multiplier", 1.0))
        self.logit_softcap = draft_value(config, "final_logit_softcapping")
        hidden = config.hidden_size
        with built_like(target):
            self.fc = Linear(len(self.target_layer_ids) * hidden, hidden, dtype=dtype, prefix="fc")
            self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
            self.layers = nn.ModuleList(
                DFlashDecoderLayer(config, i, dtype, f"layers.{i}") for i in range(config.num_hidden_layers)
            )
            self.norm = RMSNorm(hidden, config.rms_norm_eps)

    @classmethod
    def load(cls, path: str | Path, target, dtype: torch.dtype) -> DFlashDraftModel:
        """Read a z-lab drafter directory, check it fits `target`, build, load strictly, pack for
        oneDNN where the target's linears are packed."""
        config = check_drafter(Path(path), target.config)
        model = cls(config, target, dtype)
        model.load_weights(iter_tensors(path))
        if packing_available(dtype, target.model.embed_tokens.weight.device):
            pack_model_linears(model)
        return model.eval()

    def load_weights(self, weights) -> None:
        load_weights(self, weights, LoadPlan(stacked=STACKED, dropped={"rotary_emb.*": "buffers recomputed at load"}))
        finish_linears(self)

    def cache_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    @torch.inference_mode()
    def write_context(self, features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """features [T, n*H]: target features of committed tokens at positions [T], KV slots [T]."""
        context = self.hidden_norm(self.fc(features.to(self.dtype)))
        for layer in self.layers:
            layer.self_attn.write_context(context, positions, slots)

    def forward(self, last_tokens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor):
        """Block hidden states [N, B, H] after the final norm. Sequence i has context_lens[i] tokens of
        context cached (its block starts at that position) and last committed token last_tokens[i]."""
        N, B = last_tokens.shape[0], self.block_size
        ids = torch.full((N, B), self.mask_token_id, dtype=torch.long, device=last_tokens.device)
        ids[:, 0] = last_tokens
        x = self.target.embed_tokens(ids) * self.embedding_scale
        positions = context_lens[:, None] + torch.arange(B, device=ids.device)
        for layer in self.layers:
            x = layer(x, positions, block_tables, context_lens)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.target.lm_head(hidden) * self.output_multiplier
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    @torch.inference_mode()
    def propose(self, last_tokens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor):
        """Greedy drafts [N, B-1] for positions context_lens[i] + 1 .. + B-1."""
        return self.compute_logits(self(last_tokens, context_lens, block_tables)[:, 1:]).argmax(dim=-1)


def target_features(captures: StepCaptures, layer_ids: list[int]) -> torch.Tensor:
    """The drafter's context input [T, n*H]: the target's outputs of decoder layers `layer_ids`
    (transformers' hidden_states[id + 1]; the last layer's after the final norm), in that order,
    from a forward whose batch had capture_layers=layer_ids."""
    return torch.cat([captures.hidden[i] for i in layer_ids], dim=-1)


def check_drafter(path: Path, target_config):
    """The one check of a drafter directory, run by --speculative-config at start and by load: the
    config as a transformers Qwen3Config (extra keys such as dflash_config kept), or an error
    naming what does not fit the target."""
    config = read_config(path)
    check_fits_target(config, target_config)
    return config


def read_config(path: Path):
    """The drafter's config.json as a transformers Qwen3Config (rope and sliding-window rules
    applied as z-lab's model sees them), extra keys (dflash_config, block_size, ...) kept."""
    from transformers import Qwen3Config

    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path} has no config.json: it is not a DFlash drafter directory")
    try:
        raw = json.loads(file.read_text())
        config = Qwen3Config.from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file}: {e}") from e
    architectures = raw.get("architectures") or []
    if "DFlashDraftModel" not in architectures:
        raise UnsupportedModelError(
            f"{path} is not a DFlash drafter: architectures {architectures}; only z-lab's DFlashDraftModel is supported"
        )
    if draft_value(config, "mask_token_id") is None:
        raise CheckpointError(f"{file}: no mask_token_id (dflash_config.mask_token_id)")
    if config.hidden_act != "silu":
        raise UnsupportedModelError(f"{file}: hidden_act {config.hidden_act!r}; DFlash drafters use silu")
    return config


def check_fits_target(config, target_config) -> None:
    """A drafter trained for another target must fail at start, naming the mismatch."""
    num_layers = target_config.num_hidden_layers
    problems = []
    if config.hidden_size != target_config.hidden_size:
        problems.append(
            f"hidden size {config.hidden_size} does not fit the target's {target_config.hidden_size} (hidden_size)"
        )
    declared = draft_value(config, "num_target_layers")
    if declared is not None and declared != num_layers:
        problems.append(
            f"num_target_layers {declared}: trained for a {declared}-layer target; this one has {num_layers}"
        )
    layer_ids = draft_value(config, "target_layer_ids") or []
    outside = [i for i in layer_ids if not 0 <= int(i) < num_layers]
    if outside:
        problems.append(f"target_layer_ids {outside} outside the target's {num_layers} layers (0..{num_layers - 1})")
    mask = draft_value(config, "mask_token_id")
    if not 0 <= int(mask) < target_config.vocab_size:
        problems.append(f"mask_token_id {mask} outside the target's vocabulary of {target_config.vocab_size}")
    block_size = int(draft_value(config, "block_size", 16))
    if block_size < 2:
        problems.append(f"block_size {block_size} < 2 proposes nothing")
    if problems:
        raise ConfigError("the DFlash drafter does not fit the target model: " + "; ".join(problems))
