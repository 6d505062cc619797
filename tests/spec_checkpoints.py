"""Tiny random checkpoints for speculative decoding: Qwen3.5 dense and MoE targets WITH an MTP head,
and z-lab-layout DFlash drafters for a given target.

transformers' Qwen3.5 classes do not build the `mtp.*` head (they ignore it on load), so the target
builder attaches one made of transformers' own modules (RMSNorms, a full-attention decoder layer, a
Linear fc) as `hf.mtp` before save_pretrained: transformers then writes it in the hub's layout
(per-expert MoE names included), and the returned model carries it for oracle tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from conftest import save_word_tokenizer
from safetensors.torch import save_file
from torch import nn

VOCAB = 512
TEXT = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"], "mtp_num_hidden_layers": 1,
    "initializer_range": 0.1,  # wider than the default so greedy decoding has clear top-1 margins
}  # fmt: skip
MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}


def target_config(moe: bool, **overrides):
    t = transformers
    fields = {**TEXT, **(MOE if moe else {}), **overrides}  # overrides may replace TEXT's sizes
    return t.Qwen3_5MoeTextConfig(**fields) if moe else t.Qwen3_5TextConfig(**fields)


def _randomize(module: nn.Module) -> None:
    """Every weight random, norms too (zero-centred: w ~ N(0, 0.1)), so a swapped norm or a wrong
    concatenation order changes the output; fused MoE experts start uninitialized otherwise."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.1 if "norm" in name else 0.08)


def hf_mtp_head(config, moe: bool) -> nn.Module:
    """The MTP head in transformers modules, with docs/reference.md s.5's names."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as dense
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as sparse

    Layer = sparse.Qwen3_5MoeDecoderLayer if moe else dense.Qwen3_5DecoderLayer
    Norm = sparse.Qwen3_5MoeRMSNorm if moe else dense.Qwen3_5RMSNorm
    hidden, eps = config.hidden_size, config.rms_norm_eps
    full = config.layer_types.index("full_attention")  # a decoder layer built as full attention
    mtp = nn.Module()
    mtp.fc = nn.Linear(2 * hidden, hidden, bias=False)
    mtp.pre_fc_norm_embedding = Norm(hidden, eps=eps)
    mtp.pre_fc_norm_hidden = Norm(hidden, eps=eps)
    mtp.layers = nn.ModuleList(Layer(config, full) for _ in range(config.mtp_num_hidden_layers))
    mtp.norm = Norm(hidden, eps=eps)
    _randomize(mtp)
    return mtp.eval()


def make_mtp_target(path: Path, moe: bool = False, seed: int = 0, **overrides):
    """A tiny Qwen3.5 target (dense or MoE) with an MTP head, saved by transformers into `path`
    with a word tokenizer; returns the fp32 transformers model, its head at `.mtp`."""
    torch.manual_seed(seed)
    config = target_config(moe, **overrides)
    cls = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
    hf = cls(config).float().eval()
    hf.mtp = hf_mtp_head(config, moe)
    hf.save_pretrained(path)
    save_word_tokenizer(path, config.vocab_size)
    return hf


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's build_target_layer_ids, restated: round(1 + i * (L - 4) / (n - 1)), L // 2 for n = 1."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    return [round(1 + i * (num_target_layers - 4) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def make_dflash_drafter(
    path: Path,
    target,
    num_layers: int = 2,
    block_size: int = 4,
    target_layer_ids: list[int] | None = None,
    mask_token_id: int | None = None,
    layer_types: list[str] | None = None,
    sliding_window: int | None = None,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 80,
    rope_theta: float = 10000.0,
    is_causal: bool | None = None,
    extra: dict | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A z-lab DFlashDraftModel directory for `target` (its text config): config.json with
    architectures, block_size, num_target_layers, dflash_config{mask_token_id, target_layer_ids}
    (+ `extra` entries), optional layer_types/sliding_window/is_causal; model.safetensors with docs/reference.md
    s.6's tensors, no `model.` prefix. Returns the tensors."""
    H = target.hidden_size
    layer_ids = target_layer_ids if target_layer_ids is not None else default_target_layer_ids(
        target.num_hidden_layers, num_layers
    )  # fmt: skip
    config = transformers.Qwen3Config(
        vocab_size=target.vocab_size, hidden_size=H, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, rms_norm_eps=1e-6,
        max_position_embeddings=4096, tie_word_embeddings=False, layer_types=layer_types,
        use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )  # fmt: skip
    config.architectures = ["DFlashDraftModel"]
    config.block_size = block_size
    config.num_target_layers = target.num_hidden_layers
    if is_causal is not None:  # z-lab: overrides every layer's causality (sliding layers default causal)
        config.is_causal = is_causal
    config.dflash_config = {
        "mask_token_id": target.vocab_size - 1 if mask_token_id is None else mask_token_id,
        "target_layer_ids": layer_ids,
        **(extra or {}),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, norm=False):
        t = torch.randn(*shape, generator=g)
        return 1.0 + 0.1 * t if norm else 0.08 * t

    q, kv, inter = num_attention_heads * head_dim, num_key_value_heads * head_dim, intermediate_size
    tensors = {"fc.weight": rand(H, len(layer_ids) * H), "hidden_norm.weight": rand(H, norm=True),
               "norm.weight": rand(H, norm=True)}  # fmt: skip
    for i in range(num_layers):
        p = f"layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": rand(H, norm=True), p + "post_attention_layernorm.weight": rand(H, norm=True),
            p + "self_attn.q_proj.weight": rand(q, H), p + "self_attn.k_proj.weight": rand(kv, H),
            p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, q),
            p + "self_attn.q_norm.weight": rand(head_dim, norm=True),
            p + "self_attn.k_norm.weight": rand(head_dim, norm=True),
            p + "mlp.gate_proj.weight": rand(inter, H), p + "mlp.up_proj.weight": rand(inter, H),
            p + "mlp.down_proj.weight": rand(H, inter),
        })  # fmt: skip
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def edit_config(path: Path, **changes) -> None:
    """Rewrite top-level keys of a directory's config.json (for error tests)."""
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))
