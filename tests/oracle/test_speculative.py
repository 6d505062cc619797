"""Speculative decoding through the whole engine, on tiny random checkpoints.

- Lossless at T=0: every method (n-gram, MTP, DFlash, and a planted proposer that is right only up
  to a random position, so partial acceptance and GDN rollback happen every step) gives token for
  token the output of the same engine without drafting, for a batch of mixed prompts with chunked
  prefill and preemption, on the hybrid Qwen3.5 dense and MoE targets and on an attention-only Llama
  with prefix caching.
- A planted proposer right for exactly j tokens is accepted for exactly j; all-correct proposals
  give k + 1 tokens per step; the metrics count exactly that.
- The MTP and DFlash drafts the engine proposes (incremental caches through chunked prefill,
  preemption and rejections) equal a full recompute from transformers' model of the committed
  tokens (the references of test_mtp.py and test_dflash.py).
- EOS, stop token ids, stop strings and max_tokens inside an accepted run end the output at the
  right token.
"""
from __future__ import annotations

import random

import pytest
import torch
from spec_checkpoints import make_dflash_drafter, make_mtp_target
from test_dflash import Reference
from test_mtp import reference_drafts, target_hidden

from fp4serve import LLM, SamplingParams

K = 3
PROMPTS = [  # mixed lengths; repeats so that n-gram lookup finds something
    list(range(10, 22)),
    [40, 41, 42, 43] * 6,
    list(range(100, 141)),
]


def greedy(max_tokens=20, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """kind ("dense" | "moe") -> (directory, transformers model, DFlash drafter tensors, the
    target's plain greedy outputs for PROMPTS under TIGHT settings); built on first use."""
    built = {}

    def get(kind: str):
        if kind not in built:
            root = tmp_path_factory.mktemp(f"spec-{kind}")
            hf = make_mtp_target(root / "target", moe=kind == "moe")
            tensors = make_dflash_drafter(root / "dflash", hf.config, num_layers=2, block_size=4, target_layer_ids=[0, 2])
            plain = tight_llm(root / "target")
            reference = outputs(plain, PROMPTS, greedy())
            assert plain.engine.scheduler.num_preemptions > 0  # the settings do preempt
            built[kind] = root, hf, tensors, reference
        return built[kind]

    return get


# Engine settings that force chunked prefill (24-token budget) and preemption: a KV cache of
# 7 blocks of 16 tokens for prompts that grow to 32, 44 and 61 tokens.
TIGHT = dict(dtype="float32", max_model_len=96, max_num_batched_tokens=24, max_num_seqs=4, block_size=16)
KV_BLOCKS = 7
SNAPSHOTS = 6


def tight_llm(path, **kw) -> LLM:
    """TIGHT settings with a cache budget of KV_BLOCKS blocks (the drafter's KV layers included)."""
    from fp4serve.config import ModelInfo

    config = ModelInfo.load(path).text_config
    attention_layers = config.layer_types.count("full_attention")
    method = (kw.get("speculative_config") or {}).get("method")
    attention_layers += {"mtp": 1, "dflash": 2}.get(method, 0)  # the DFlash drafter here has 2 layers of the same width
    kv_per_token = 2 * config.num_key_value_heads * config.head_dim * 4 * attention_layers
    conv = (config.linear_conv_kernel_dim - 1) * (2 * config.linear_num_key_heads * config.linear_key_head_dim
                                                 + config.linear_num_value_heads * config.linear_value_head_dim) * 4
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    slot = config.layer_types.count("linear_attention") * (conv + recurrent)
    kv = KV_BLOCKS * TIGHT["block_size"] * kv_per_token
    # Prefix caching (on by default) also holds SNAPSHOTS GDN snapshots of one slot's size each.
    snapshots = SNAPSHOTS * slot if kw.get("enable_prefix_caching", True) else 0
    fraction = snapshots / (kv + snapshots) * (1 + 1e-9)
    return LLM(str(path), **TIGHT, kv_cache_memory=slot * TIGHT["max_num_seqs"] + kv + snapshots,
               gdn_snapshot_fraction=fraction, **kw)  # fmt: skip


class Planted:
    """Proposes the reference continuation with a wrong token at position `wrong_at` (an int, a
    callable drawing one per call, or None for always right). Records what it proposed."""

    def __init__(self, reference: dict[tuple, list[int]], vocab: int, wrong_at=None):
        self.reference, self.vocab, self.wrong_at = reference, vocab, wrong_at
        self.proposed: list[list[int]] = []

    def propose(self, requests, limits, plan=None, step=None, num_accepted=None):
        out = []
        for request, k in zip(requests, limits):
            full = self.reference[tuple(request.prompt_token_ids)]
            done = len(request.output_token_ids)
            draft = list(full[done : done + k])
            j = self.wrong_at() if callable(self.wrong_at) else self.wrong_at
            if j is not None and j < len(draft):
                draft[j] = (draft[j] + 1) % self.vocab
            out.append(draft)
            if draft:
                self.proposed.append((draft, full[done : done + len(draft)]))
        return out


def outputs(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def planted_llm(path, reference, wrong_at, tight=True, **kw) -> tuple[LLM, Planted]:
    """An engine whose proposer is Planted (configured as n-gram, then swapped)."""
    spec = {"method": "ngram", "num_speculative_tokens": K}
    llm = tight_llm(path, speculative_config=spec) if tight else LLM(str(path), speculative_config=spec, **kw)
    planted = Planted(reference, llm.engine.vocab_size, wrong_at)
    llm.engine.proposer = planted
    return llm, planted


class Recorder:
    """Wraps the engine's proposer and keeps (committed tokens, drafts) of every proposal."""

    def __init__(self, inner):
        self.inner, self.records = inner, []

    def cache_layers(self):
        return self.inner.cache_layers()

    def propose(self, requests, limits, *args):
        drafts = self.inner.propose(requests, limits, *args)
        self.records += [(list(r.all_token_ids), d) for r, d in zip(requests, drafts) if d]
        return drafts


# ---- losslessness ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_every_method_is_lossless_on_hybrid_targets(targets, kind):
    """Also: the MTP and DFlash drafts proposed along the way (incremental caches through chunked
    prefill, preemption and rejections) equal a full recompute from transformers' model."""
    root, hf, tensors, reference = targets(kind)
    target = root / "target"
    configs = {
        "ngram": {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
        "mtp": {"method": "mtp", "num_speculative_tokens": K},
        "dflash": {"method": "dflash", "model": str(root / "dflash")},
    }
    for name, config in configs.items():
        llm = tight_llm(target, speculative_config=config)
        recorder = llm.engine.proposer = Recorder(llm.engine.proposer)
        assert outputs(llm, PROMPTS, greedy()) == reference, name
        stats = llm.engine.spec_stats
        assert stats.num_drafts > 0 and llm.engine.scheduler.num_preemptions > 0, name
        if name != "ngram":
            check_drafts = check_mtp_drafts if name == "mtp" else check_dflash_drafts
            check_drafts(hf, root, tensors, recorder.records[::6])  # a sixth of them keeps the test quick
    # partial acceptance at every step: the planted proposer is right up to a random position
    rng = random.Random(0)
    llm, planted = planted_llm(target, dict(zip(map(tuple, PROMPTS), reference)), lambda: rng.choice([0, 1, 2, None]))
    assert outputs(llm, PROMPTS, greedy()) == reference
    stats = llm.engine.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens and llm.engine.scheduler.num_preemptions > 0


def test_lossless_with_prefix_caching_on_an_attention_only_model(llama_family_checkpoints):
    """Two rounds of prompts sharing a 40-token prefix: the second round is served from the prefix
    cache, which holds only committed tokens, and both rounds equal decoding without drafts."""
    path, _ = llama_family_checkpoints["llama-tied"]
    shared = list(range(50, 90))
    prompts = [shared + [i, i + 1, i + 2] for i in (1, 5)] + PROMPTS[1:2]
    settings = dict(dtype="float32", max_num_batched_tokens=32, enable_prefix_caching=True)
    reference = outputs(LLM(str(path), **settings), prompts, greedy(16))
    rng = random.Random(1)
    table = dict(zip(map(tuple, prompts), reference))
    llm, _ = planted_llm(path, table, lambda: rng.choice([0, 1, 2, None]), tight=False, **settings)
    for _ in range(2):
        assert outputs(llm, prompts, greedy(16)) == reference
    assert llm.engine.block_pool.hits >= 2 * len(shared) // 16


# ---- planted proposals: exact acceptance and metrics -----------------------------------------


@pytest.mark.parametrize("wrong_at", [0, 2, None])
def test_planted_proposer_is_accepted_for_exactly_its_correct_prefix(targets, wrong_at):
    root, _, _, reference = targets("dense")  # one target is enough for the counts
    target = root / "target"
    # Room for everything (no preemption drops drafts, no budget trims them), so every proposal is
    # verified whole; all correct: one request alone, so the step count is exact.
    prompts = PROMPTS[:1] if wrong_at is None else PROMPTS
    table = dict(zip(map(tuple, PROMPTS), reference))
    llm, planted = planted_llm(target, table, wrong_at, tight=False, dtype="float32")
    steps, finished = 0, {}
    ids = [llm.engine.add_request({"prompt_token_ids": p}, greedy()) for p in prompts]
    while llm.engine.has_unfinished_requests():
        finished.update((o.request_id, o.outputs[0].token_ids) for o in llm.engine.step() if o.finished)
        steps += 1
    assert [finished[i] for i in ids] == reference[: len(prompts)]
    stats = llm.engine.spec_stats
    # every draft is accepted for exactly its correct prefix, position by position
    expected_per_position = [0] * K
    accepted = 0
    for draft, right in planted.proposed:
        n = next((j for j, (a, b) in enumerate(zip(draft, right)) if a != b), len(draft))
        assert n == (len(draft) if wrong_at is None or wrong_at >= len(draft) else wrong_at)
        accepted += n
        for j in range(n):
            expected_per_position[j] += 1
    assert stats.num_drafts == len(planted.proposed) > 0
    assert stats.num_draft_tokens == sum(len(d) for d, _ in planted.proposed)
    assert stats.num_accepted_tokens == accepted and stats.accepted_per_position == expected_per_position
    if wrong_at is None:  # one prefill step, then K + 1 tokens per step for the other 19 (the last step: 3)
        assert accepted == stats.num_draft_tokens and steps == 1 + -(-19 // (K + 1))
    metrics = {m.name: m for m in llm.get_metrics()}
    assert metrics["vllm:spec_decode_num_drafts"].value == stats.num_drafts
    assert metrics["vllm:spec_decode_num_accepted_tokens"].value == accepted
    assert metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values == expected_per_position
    assert stats.mean_acceptance_length == pytest.approx(1 + accepted / stats.num_drafts)


def test_stops_inside_an_accepted_run_end_at_the_right_token(targets):
    root, _, _, reference = targets("dense")
    target = root / "target"
    plain = LLM(str(target), dtype="float32")
    prompt, free = PROMPTS[0], reference[0]
    llm, _ = planted_llm(target, {tuple(prompt): free}, None, tight=False, dtype="float32")
    stop_token = free[6]
    cases = [
        greedy(20, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=20, stop=[f"w{free[9]} "]),
        greedy(10),  # max_tokens inside a run of K + 1
    ]
    for params in cases:
        expected = plain.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
        got = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            expected.token_ids, expected.text, expected.finish_reason, expected.stop_reason,
        )  # fmt: skip
        assert len(got.token_ids) < 20
    # EOS (the tokenizer's <|endoftext|>) planted inside an accepted run ends the request right there
    eos = max(llm.engine.eos_token_ids)
    llm.engine.proposer.reference[tuple(prompt)] = free[:5] + [eos] + free[6:]
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    expected = plain.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert got.token_ids == expected.token_ids


# ---- model drafters against a full recompute --------------------------------------------------


def check_mtp_drafts(hf, root, tensors, records) -> None:
    assert len(records) >= 3
    for tokens, drafts in records:
        expected, _ = reference_drafts(hf, tokens[1:], target_hidden(hf, tokens[:-1]), len(drafts))
        assert drafts == expected


def check_dflash_drafts(hf, root, tensors, records) -> None:
    assert len(records) >= 3
    reference = Reference(root / "dflash", tensors, hf)
    ids = reference.config.dflash_config["target_layer_ids"]
    for tokens, drafts in records:
        with torch.inference_mode():
            states = hf.model(input_ids=torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        features = torch.cat([states[i + 1][0] for i in ids], dim=-1)
        expected = reference.logits(reference.hidden(features, tokens[-1])[1:]).argmax(-1).tolist()
        assert drafts == expected[: len(drafts)]
