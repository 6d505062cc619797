"""The DFlash drafter's cached forward against a straightforward full recompute (no caches).

The reference restates z-lab's DFlashDraftModel from transformers' Qwen3 modules (RMSNorm, MLP,
rotary embedding): every draft recomputes the context K/V of ALL committed positions from the
target features, concatenates the block's K/V, and attends with the layer's mask. fp4serve's
drafter writes context K/V once per committed token into paged blocks and reads them back; the
rounds below commit a random number of drafts each step, optionally writing the rejected rows'
context too (junk features), which must leave no trace.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from spec_checkpoints import VOCAB, edit_config, make_dflash_drafter, make_mtp_target
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from fp4serve.config import ModelInfo
from fp4serve.engine.cache import allocate_caches
from fp4serve.errors import CheckpointError, ConfigError, UnsupportedModelError
from fp4serve.formats.safetensors_io import iter_tensors
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.models.dflash import DFlashDraftModel, target_features
from fp4serve.models.registry import model_class

ATOL = 1e-4
BLOCK = 16
MAX_BLOCKS = 8


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny Qwen3.5 target (ours, loaded from a transformers checkpoint) and transformers' model."""
    path = tmp_path_factory.mktemp("dflash-target")
    hf = make_mtp_target(path)
    info = ModelInfo.load(path)
    ours = model_class(info.architectures)(info.text_config, torch.float32)
    ours.load_weights(iter_tensors(path))
    return hf, ours


DRAFTERS = {
    "full-attention": dict(num_layers=2, block_size=4, target_layer_ids=[1, 2]),
    "causal-sliding": dict(
        num_layers=2, block_size=5, target_layer_ids=[0, 1, 2], layer_types=["sliding_attention", "full_attention"],
        sliding_window=6, rope_theta=1e6,
    ),
    "two-sided-window-scaled": dict(
        num_layers=2, block_size=6, target_layer_ids=[2], layer_types=["sliding_attention"] * 2, sliding_window=3,
        is_causal=False, extra={"input_embedding_scale": 1.5, "output_multiplier": 0.5, "final_logit_softcapping": 3.0},
    ),
}  # fmt: skip


class Reference:
    """z-lab's DFlashDraftModel forward, no cache: context K/V recomputed from all features each call."""

    def __init__(self, path, tensors: dict, hf):
        self.config = config = Qwen3Config.from_pretrained(path)
        self.hf = hf
        self.w = tensors
        dflash = config.dflash_config
        self.block_size, self.mask = config.block_size, dflash["mask_token_id"]
        self.scale_in = dflash.get("input_embedding_scale", 1.0)
        self.multiplier = dflash.get("output_multiplier", 1.0)
        self.softcap = dflash.get("final_logit_softcapping")
        self.rotary = Qwen3RotaryEmbedding(config)
        self.causal = getattr(config, "is_causal", None)

        def norm(name, size):
            n = Qwen3RMSNorm(size, eps=config.rms_norm_eps)
            n.weight.data.copy_(tensors[name])
            return n

        self.hidden_norm = norm("hidden_norm.weight", config.hidden_size)
        self.norm = norm("norm.weight", config.hidden_size)
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"layers.{i}."
            mlp = Qwen3MLP(config)
            mlp.load_state_dict({k[len(p + "mlp.") :]: v for k, v in tensors.items() if k.startswith(p + "mlp.")})
            layer_type = config.layer_types[i]
            self.layers.append(dict(
                p=p, mlp=mlp, ln1=norm(p + "input_layernorm.weight", config.hidden_size),
                ln2=norm(p + "post_attention_layernorm.weight", config.hidden_size),
                q_norm=norm(p + "self_attn.q_norm.weight", config.head_dim),
                k_norm=norm(p + "self_attn.k_norm.weight", config.head_dim),
                causal=layer_type == "sliding_attention" if self.causal is None else self.causal,
                window=config.sliding_window if layer_type == "sliding_attention" else None,
            ))  # fmt: skip

    @torch.inference_mode()
    def hidden(self, features: torch.Tensor, last_token: int) -> torch.Tensor:
        """features [P, n*H] of committed positions 0..P-1; block at P..P+B-1 -> [B, H]."""
        c, w = self.config, self.w
        P, B, D = features.shape[0], self.block_size, c.head_dim
        ctx = self.hidden_norm(F.linear(features, w["fc.weight"]))
        ids = torch.tensor([last_token] + [self.mask] * (B - 1))
        x = self.hf.model.embed_tokens(ids) * self.scale_in
        cos, sin = self.rotary(x[None], torch.arange(P + B)[None])
        cos, sin = cos[0][:, None], sin[0][:, None]  # [P+B, 1, D]
        q_pos, k_pos = torch.arange(P, P + B)[:, None], torch.arange(P + B)[None, :]
        for layer in self.layers:
            p = layer["p"] + "self_attn."
            h = layer["ln1"](x)
            q = layer["q_norm"](F.linear(h, w[p + "q_proj.weight"]).view(B, -1, D))
            both = torch.cat([ctx, h])
            k = layer["k_norm"](F.linear(both, w[p + "k_proj.weight"]).view(P + B, -1, D))
            v = F.linear(both, w[p + "v_proj.weight"]).view(P + B, -1, D)
            q = q * cos[P:] + rotate_half(q) * sin[P:]
            k = k * cos + rotate_half(k) * sin
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            visible = torch.ones(B, P + B, dtype=torch.bool)
            if layer["causal"]:
                visible &= k_pos <= q_pos
            if layer["window"] is not None:
                visible &= q_pos - k_pos < layer["window"]
                if not layer["causal"]:
                    visible &= k_pos - q_pos < layer["window"]
            scores = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(B, -1)
            x = x + F.linear(attn, w[p + "o_proj.weight"])
            x = x + layer["mlp"](layer["ln2"](x))
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf.lm_head(hidden) * self.multiplier
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits


def _slots(slot: int, positions: torch.Tensor) -> torch.Tensor:
    table = torch.arange(slot * MAX_BLOCKS, (slot + 1) * MAX_BLOCKS)
    return table[positions // BLOCK] * BLOCK + positions % BLOCK


@pytest.mark.parametrize(
    "name, write_rejected",
    [("full-attention", False), ("full-attention", True), ("causal-sliding", True), ("two-sided-window-scaled", True)],
)
def test_cached_drafts_match_full_recompute(target, tmp_path, name, write_rejected):
    """Rounds of: write the context of the rows verified since the last draft (only the committed
    ones, or also the rejected ones with junk features), draft a block, commit a random number of
    its drafts. Every block's hidden states, logits and drafts equal the full recompute."""
    hf, ours = target
    tensors = make_dflash_drafter(tmp_path, hf.config, **DRAFTERS[name])
    drafter = DFlashDraftModel.load(tmp_path, ours, torch.float32)
    allocate_caches(drafter.cache_layers(), 2, 2**22, BLOCK, torch.float32, torch.device("cpu"))
    ref = Reference(tmp_path, tensors, hf)
    B, width = drafter.block_size, drafter.fc.in_features
    gen = torch.Generator().manual_seed(7)
    features = {s: torch.randn(80, width, generator=gen) for s in (0, 1)}
    tokens = {s: torch.randint(0, VOCAB - 1, (80,), generator=gen).tolist() for s in (0, 1)}
    committed = {0: 11, 1: 3}  # tokens with target features; the token at that position is the last one
    written = {0: 0, 1: 0}
    tables = torch.stack([torch.arange(s * MAX_BLOCKS, (s + 1) * MAX_BLOCKS) for s in (0, 1)])
    for _ in range(5):
        for s in (0, 1):  # the verified rows since the last draft: committed ones, then (maybe) rejected
            end = written[s] + B if write_rejected and written[s] else committed[s]
            pos = torch.arange(written[s], end)
            feats = features[s][written[s] : end].clone()
            feats[committed[s] - written[s] :] = torch.randn(end - committed[s], width, generator=gen)  # junk
            drafter.write_context(feats, pos, _slots(s, pos))
            written[s] = committed[s]
        last = torch.tensor([tokens[s][committed[s]] for s in (0, 1)])
        lens = torch.tensor([committed[0], committed[1]])
        with torch.inference_mode():
            hidden = drafter(last, lens, tables)
            logits = drafter.compute_logits(hidden[:, 1:])
        drafts = drafter.propose(last, lens, tables)
        assert drafts.shape == (2, B - 1)
        for s in (0, 1):
            ref_hidden = ref.hidden(features[s][: committed[s]], tokens[s][committed[s]])
            torch.testing.assert_close(hidden[s], ref_hidden, atol=ATOL, rtol=0)
            ref_logits = ref.logits(ref_hidden[1:])
            torch.testing.assert_close(logits[s], ref_logits, atol=ATOL, rtol=0)
            assert drafts[s].tolist() == ref_logits.argmax(-1).tolist()
        for s in (0, 1):  # the target accepted a random number of the B-1 drafts, plus its own token
            committed[s] += int(torch.randint(0, B, (1,), generator=gen)) + 1


def test_target_features_are_layer_outputs(target):
    """Captured features equal transformers' hidden_states[id + 1] (the output of decoder layer id,
    the last layer's after the final norm)."""
    hf, ours = target
    allocate_caches(ours.cache_layers(), 1, 2**22, BLOCK, torch.float32, torch.device("cpu"))
    tokens = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(3))
    layer_ids = [2, 0, 3, 2]  # 3: the last layer, reported after the final norm
    batch = build_batch([SequenceRows(tokens.tolist(), 0, list(range(MAX_BLOCKS)))], BLOCK, capture_layers=tuple(layer_ids))
    with torch.inference_mode():
        ours(batch)
        ref = hf(input_ids=tokens[None], output_hidden_states=True).hidden_states
    expected = torch.cat([ref[3][0], ref[1][0], ref[4][0], ref[3][0]], dim=-1)
    torch.testing.assert_close(target_features(batch.captures, layer_ids), expected, atol=ATOL, rtol=0)


def test_drafter_that_does_not_fit_the_target(target, tmp_path):
    hf, ours = target
    make_dflash_drafter(tmp_path / "ok", hf.config, target_layer_ids=[0, 2])
    assert DFlashDraftModel.load(tmp_path / "ok", ours, torch.float32).target_layer_ids == [0, 2]
    cases = {
        "hidden_size": ({}, {"hidden_size": 32}),
        "num_target_layers": ({}, {"num_target_layers": 64}),
        r"target_layer_ids \[4\]": ({"target_layer_ids": [1, 4]}, {}),
        "mask_token_id": ({"mask_token_id": VOCAB}, {}),
        "block_size": ({"block_size": 1}, {}),
    }
    for i, (message, (build, edit)) in enumerate(cases.items()):
        path = tmp_path / str(i)
        make_dflash_drafter(path, hf.config, **build)
        edit_config(path, **edit)
        with pytest.raises(ConfigError, match=message):
            DFlashDraftModel.load(path, ours, torch.float32)


def test_malformed_drafter_directories(target, tmp_path):
    hf, ours = target
    with pytest.raises(CheckpointError, match="no config.json"):
        DFlashDraftModel.load(tmp_path, ours, torch.float32)
    tensors = make_dflash_drafter(tmp_path / "a", hf.config)
    edit_config(tmp_path / "a", architectures=["DFlash2DraftModel"])
    with pytest.raises(UnsupportedModelError, match="DFlash2DraftModel"):
        DFlashDraftModel.load(tmp_path / "a", ours, torch.float32)
    make_dflash_drafter(tmp_path / "b", hf.config)
    del tensors["layers.1.self_attn.k_norm.weight"]
    tensors["layers.0.self_attn.extra.weight"] = torch.zeros(4)
    save_file(tensors, str(tmp_path / "b" / "model.safetensors"))
    names = r"layers\.1\.self_attn\.k_norm\.weight.*layers\.0\.self_attn\.extra\.weight"
    with pytest.raises(CheckpointError, match=names):
        DFlashDraftModel.load(tmp_path / "b", ours, torch.float32)
    make_dflash_drafter(tmp_path / "c", hf.config, mask_token_id=5)
    edit_config(tmp_path / "c", dflash_config={"target_layer_ids": [1, 2]})
    with pytest.raises(CheckpointError, match="mask_token_id"):
        DFlashDraftModel.load(tmp_path / "c", ours, torch.float32)


def test_bf16_drafter_built_like_the_target(target, tmp_path):
    """For a bf16 target loaded as the engine loads it: every drafter parameter in bf16, and its
    block hidden states agree with the fp32 reference to bf16 precision."""
    from fp4serve.models.loader import load_model

    hf, _ = target
    ckpt = tmp_path / "target"
    make_mtp_target(ckpt)
    bf16_target = load_model(ModelInfo.load(ckpt), torch.bfloat16, torch.device("cpu"))
    tensors = make_dflash_drafter(tmp_path / "drafter", hf.config, **DRAFTERS["causal-sliding"])
    drafter = DFlashDraftModel.load(tmp_path / "drafter", bf16_target, torch.bfloat16)
    assert {p.dtype for p in drafter.parameters()} == {torch.bfloat16}
    allocate_caches(drafter.cache_layers(), 1, 2**22, BLOCK, torch.bfloat16, torch.device("cpu"))
    features = torch.randn(20, drafter.fc.in_features, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(20)
    drafter.write_context(features, positions, _slots(0, positions))
    with torch.inference_mode():
        ours = drafter(torch.tensor([5]), torch.tensor([20]), torch.arange(MAX_BLOCKS)[None])[0].float()
    ref = Reference(tmp_path / "drafter", tensors, hf).hidden(features, 5)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
