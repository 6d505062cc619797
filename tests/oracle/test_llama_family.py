"""Llama, Qwen2 and Qwen3 in fp4serve against transformers' own implementation (fp32)."""
from __future__ import annotations

import pytest
import torch

from fp4serve import LLM, SamplingParams
from fp4serve.engine.request import Request

NAMES = ["llama-tied", "llama3-rope-untied", "qwen2-bias", "qwen3-qknorm", "llama-yarn", "qwen2-sliding", "llama-linear-rope"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def prompts(n: int, vocab: int = 290, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 40, 9, 64, 1, 25, 33][:n]
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def engine_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """Per-position logits of one prompt, computed chunk by chunk through scheduler, paged KV
    cache and runner exactly as serving does (chunk size = max_num_batched_tokens)."""
    engine = llm.engine
    request = Request("probe", token_ids, SamplingParams(max_tokens=1), engine.max_model_len)
    engine.scheduler.add(request)
    rows = []
    while request.num_computed_tokens < len(token_ids):
        plan = engine.scheduler.schedule()
        batch = engine.runner.prepare(plan)
        with torch.inference_mode():
            rows.append(engine.model.compute_logits(engine.model(batch)))
        engine.scheduler.commit(plan, [[] for _ in plan.scheduled])
    engine.scheduler.abort("probe")
    return torch.cat(rows)


def hf_greedy(model, token_ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([token_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(token_ids), dtype=torch.long))  # fmt: skip
    return out[0, len(token_ids) :].tolist()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", [2048, 7])
def test_logits_match_transformers(llama_family_checkpoints, name, chunk):
    path, hf = llama_family_checkpoints[name]
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=chunk, kv_cache_memory="4MiB", block_size=4)
    ids = prompts(8)[4]  # 64 tokens: several blocks and chunks
    ours = engine_logits(llm, ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_batch_matches_transformers(llama_family_checkpoints, name):
    path, hf = llama_family_checkpoints[name]
    batch = prompts(8)
    expected = [hf_greedy(hf, p, 32) for p in batch]
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB")
    single = llm.generate({"prompt_token_ids": batch[2]}, GREEDY)[0]
    assert single.outputs[0].token_ids == expected[2]
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_chunked_prefill_mixed_with_decodes(llama_family_checkpoints):
    path, hf = llama_family_checkpoints["qwen3-qknorm"]
    batch = prompts(8)
    expected = [hf_greedy(hf, p, 32) for p in batch]
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=7, kv_cache_memory="4MiB", block_size=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_preemption_by_recompute(llama_family_checkpoints):
    path, hf = llama_family_checkpoints["llama-tied"]
    batch = prompts(8)
    expected = [hf_greedy(hf, p, 32) for p in batch]
    # 768 bytes per token: room for 160 tokens, far less than 8 sequences of up to 96 tokens.
    llm = LLM(str(path), dtype="float32", kv_cache_memory=160 * 768, block_size=16, max_model_len=128)
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.block_pool.num_free == llm.engine.block_pool.num_blocks


def test_prefix_cache_hits_and_same_tokens(llama_family_checkpoints):
    path, hf = llama_family_checkpoints["qwen2-bias"]
    shared = prompts(8)[4]
    batch = [shared + p for p in prompts(4, seed=7)]
    expected = [hf_greedy(hf, p, 32) for p in batch]
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB", enable_prefix_caching=True, max_num_batched_tokens=4096)
    first = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY)
    second = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY)
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in second] == expected
    # The second run finds every full block of each prompt (bar the last token) in the cache.
    for o, p in zip(second, batch):
        assert o.num_cached_tokens == (len(p) - 1) // 16 * 16 > 0
    assert llm.engine.block_pool.num_free == llm.engine.block_pool.num_blocks
