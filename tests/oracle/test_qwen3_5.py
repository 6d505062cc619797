"""Qwen3.5 dense/MoE hybrids against transformers, on tiny random checkpoints written by transformers.

Every test drives fp4serve's model with hand-built ForwardBatches (whole prefill, 7-token chunks,
decodes, several sequences per step, mixed prefill/decode steps) and compares fp32 logits at every
computed position with transformers' own forward or greedy generate. GDN state slots are filled
with noise before each test, so a fresh sequence that read its slot instead of zeros would fail.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from conftest import save_word_tokenizer
from safetensors.torch import save_file

from fp4serve import LLM, SamplingParams
from fp4serve.config import ModelInfo
from fp4serve.engine.cache import allocate_caches
from fp4serve.formats.safetensors_io import iter_tensors
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.layers.cache_spec import StateSpec
from fp4serve.models.registry import model_class

ATOL = 1e-4
BLOCK = 16
MAX_BLOCKS = 8  # KV blocks per sequence: 128 tokens
VOCAB = 512

TEXT = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "initializer_range": 0.1,  # wider than the default so greedy decoding has clear top-1 margins
}  # fmt: skip
MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}
VISION = {
    "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64, "patch_size": 4,
    "num_position_embeddings": 16,
}  # fmt: skip


def _build(kind: str, path):
    """A tiny transformers model of `kind` written to `path`; returns the in-memory transformers model."""
    t = transformers
    torch.manual_seed(0)
    if kind == "dense":
        hf = t.Qwen3_5ForCausalLM(t.Qwen3_5TextConfig(**TEXT))
    elif kind == "dense-vl-tied":  # tie flag only at the top level, as transformers reads it; hub-style mrope
        rope = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                "mrope_interleaved": True}  # fmt: skip
        text = {**TEXT, "rope_parameters": rope}
        hf = t.Qwen3_5ForConditionalGeneration(
            t.Qwen3_5Config(text_config=text, vision_config=VISION, tie_word_embeddings=True)
        )
    elif kind == "moe":  # save_pretrained writes the hub's per-expert names
        hf = t.Qwen3_5MoeForCausalLM(t.Qwen3_5MoeTextConfig(**TEXT, **MOE))
    elif kind == "moe-vl-fused":  # the in-memory state dict: fused 3-D experts under model.language_model.
        hf = t.Qwen3_5MoeForConditionalGeneration(t.Qwen3_5MoeConfig(text_config={**TEXT, **MOE}, vision_config=VISION))
    hf.eval()
    if kind == "moe-vl-fused":
        hf.config.architectures = [type(hf).__name__]
        hf.config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf.state_dict())
    else:
        hf.save_pretrained(path)
    save_word_tokenizer(path, VOCAB)  # for the LLM end-to-end test
    return hf


class Harness:
    """fp4serve's model for one checkpoint plus a KV/state layout: sequence slot s owns KV blocks
    [s*MAX_BLOCKS, (s+1)*MAX_BLOCKS) and GDN state slot s."""

    def __init__(self, path):
        self.path = path
        info = ModelInfo.load(path)
        self.model = model_class(info.architectures)(info.text_config, torch.float32)
        self.model.load_weights(iter_tensors(path))
        allocate_caches(self.model.cache_layers(), 4, 2**24, BLOCK, torch.float32, torch.device("cpu"))

    def scramble_states(self) -> None:
        for layer in self.model.cache_layers():
            if isinstance(layer.cache_spec(), StateSpec):
                layer.conv_state.normal_()
                layer.recurrent_state.normal_()

    def step(self, work: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """One forward over (slot, new token ids, tokens already computed) per sequence; logits per sequence."""
        seqs = [
            SequenceRows(list(tokens), done, list(range(slot * MAX_BLOCKS, (slot + 1) * MAX_BLOCKS)), slot)
            for slot, tokens, done in work
        ]
        batch = build_batch(seqs, BLOCK)
        with torch.inference_mode():
            logits = self.model.compute_logits(self.model(batch))
        return [logits[batch.seq_rows(i)] for i in range(batch.num_seqs)]


KINDS = ["dense", "dense-vl-tied", "moe", "moe-vl-fused"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = _build(request.param, path)
    harness = Harness(path)
    harness.scramble_states()
    return hf, harness


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(hf, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(input_ids=torch.tensor([tokens])).logits[0].float()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err < ATOL, f"max |logit diff| {err:.2e}"


def test_checkpoint_layout(pair):
    hf, harness = pair
    tied = harness.model.lm_head.weight is harness.model.model.embed_tokens.weight
    assert tied == hf.config.tie_word_embeddings
    rotary = next(m.self_attn.rotary for m in harness.model.model.layers if m.layer_type == "full_attention")
    assert rotary.rotary_dim == int(16 * hf.config.get_text_config().rope_parameters["partial_rotary_factor"])


def test_whole_prefill(pair):
    hf, harness = pair
    harness.scramble_states()
    tokens = _prompt(70, 1)  # > 64: two chunks of the chunked delta rule
    (logits,) = harness.step([(0, tokens, 0)])
    assert_logits_close(logits, _reference(hf, tokens))


def test_chunked_prefill_carries_state(pair):
    hf, harness = pair
    harness.scramble_states()
    tokens = _prompt(45, 2)
    pieces = [harness.step([(1, tokens[s : s + 7], s)])[0] for s in range(0, len(tokens), 7)]
    assert_logits_close(torch.cat(pieces), _reference(hf, tokens))


def test_two_sequences_in_one_batch(pair):
    hf, harness = pair
    harness.scramble_states()
    a, b = _prompt(33, 3), _prompt(12, 4)
    logits_a, logits_b = harness.step([(2, a, 0), (0, b, 0)])
    assert_logits_close(logits_a, _reference(hf, a))
    assert_logits_close(logits_b, _reference(hf, b))


def test_mixed_prefill_and_decode_steps(pair):
    """Steps that mix prefill chunks, one-token decodes and a fresh one-token prompt."""
    hf, harness = pair
    harness.scramble_states()
    a, b, c = _prompt(22, 5), _prompt(10, 6), _prompt(6, 7)
    schedule = [
        [(0, a[:20], 0), (1, b[:1], 0)],
        [(0, a[20:21], 20), (1, b[1:9], 1), (3, c[:5], 0)],
        [(0, a[21:22], 21), (1, b[9:10], 9), (3, c[5:6], 5)],
    ]
    got = {0: [], 1: [], 3: []}
    for work in schedule:
        for (slot, _, _), logits in zip(work, harness.step(work)):
            got[slot].append(logits)
    for slot, tokens in ((0, a), (1, b), (3, c)):
        assert_logits_close(torch.cat(got[slot]), _reference(hf, tokens))


def test_greedy_decode_matches_generate(pair):
    """Two sequences prefilled together, then 16 batched one-token steps, against generate()."""
    hf, harness = pair
    harness.scramble_states()
    prompts = [_prompt(19, 8), _prompt(9, 9)]
    refs = []
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([p]), max_new_tokens=16, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        refs.append((out.sequences[0, len(p) :].tolist(), torch.cat(out.logits).float()))
    logits = [x[-1:] for x in harness.step([(0, prompts[0], 0), (2, prompts[1], 0)])]
    steps = [logits]
    tokens = [[int(x.argmax())] for x in logits]
    for j in range(15):
        logits = harness.step([(s, [tokens[i][-1]], len(prompts[i]) + j) for i, s in enumerate((0, 2))])
        steps.append(logits)
        for i, x in enumerate(logits):
            tokens[i].append(int(x.argmax()))
    for i, (ref_tokens, ref_logits) in enumerate(refs):
        assert tokens[i] == ref_tokens
        assert_logits_close(torch.cat([s[i] for s in steps]), ref_logits)


def test_moe_block_both_layouts_match_transformers():
    """transformers' fused 3-D experts and the hub's per-expert tensors load into identical blocks."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    from fp4serve.layers.moe import SparseMoeBlock, split_fused_experts
    from fp4serve.models.qwen3_5 import STACKED
    from fp4serve.models.weights import LoadPlan, load_weights

    config = transformers.Qwen3_5MoeTextConfig(**{**TEXT, **MOE, "num_experts_per_tok": 3})
    torch.manual_seed(0)
    hf = Qwen3_5MoeSparseMoeBlock(config)
    for p in hf.parameters():
        p.data.normal_(0, 0.1)
    fused = {k: v.detach() for k, v in hf.state_dict().items()}
    per_expert = dict(split_fused_experts(fused.items()))
    assert "experts.3.up_proj.weight" in per_expert and "experts.gate_up_proj" in fused
    blocks = []
    for weights in (fused, per_expert):
        block = SparseMoeBlock(64, 8, 3, 32, 48, True, torch.float32)
        load_weights(block, split_fused_experts(weights.items()), LoadPlan(stacked=STACKED))
        blocks.append(block)
    x = torch.randn(37, 64)
    with torch.inference_mode():
        ref = hf(x[None])[0]
        a, b = (block(x) for block in blocks)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)


def test_llm_generate_matches_transformers(pair):
    """The whole engine (scheduler, 7-token chunked prefill beside decodes, runner, state slots) against
    transformers' greedy choice: one transformers forward over prompt + our 32 tokens must pick each
    of our tokens (so generate() would produce the same sequence), much faster than 256 generate steps."""
    hf, harness = pair
    lengths = [3, 17, 40, 9, 64, 1, 25, 33]
    prompts = [_prompt(n, 100 + i) for i, n in enumerate(lengths)]
    llm = LLM(
        str(harness.path), dtype="float32", max_num_batched_tokens=7, kv_cache_memory="4MiB", block_size=4,
        max_model_len=128,
    )  # fmt: skip
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    for p, out in zip(prompts, outputs):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 32
        choices = _reference(hf, p + tokens[:-1])[len(p) - 1 :].argmax(-1).tolist()
        assert tokens == choices


def test_preemption_restores_gdn_state(pair):
    """A cache too small for all 8 sequences forces preemption by recompute: the preempted
    sequences lose their KV blocks and GDN state slot and rebuild both; the tokens must not change."""
    hf, harness = pair
    prompts = [_prompt(n, 200 + i) for i, n in enumerate([20, 31, 9, 40, 15, 27, 5, 36])]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLM(str(harness.path), dtype="float32", kv_cache_memory="4MiB", max_model_len=128, max_num_seqs=8)
    expected = [o.outputs[0].token_ids for o in roomy.generate([{"prompt_token_ids": p} for p in prompts], greedy)]
    capacity = roomy.engine.capacity
    tight = capacity.state_bytes + capacity.kv_bytes_per_token * 160  # 160 tokens of KV for ~380 needed
    llm = LLM(str(harness.path), dtype="float32", kv_cache_memory=tight, max_model_len=128, max_num_seqs=8)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.block_pool.num_free == llm.engine.block_pool.num_blocks
    assert sorted(llm.engine.scheduler.free_slots) == list(range(8))
