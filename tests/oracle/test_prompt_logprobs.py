"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers' forward: log_softmax of its
logits at every position, whole prompt and across chunked prefill, for Llama-family models and a
tiny Qwen3.5 hybrid; and n > 1 through LLM.generate."""

from __future__ import annotations

import pytest
import torch
from test_qwen3_5 import _build

from fp4serve import LLM, SamplingParams


def _prompt(n: int, vocab: int, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab - 10, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def assert_matches_oracle(prompt_logprobs, ids: list[int], reference: torch.Tensor, k: int) -> None:
    """Entry p (p > 0) is token p under the logits of row p - 1: its logprob, rank and top k."""
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        entry, row = prompt_logprobs[p], reference[p - 1]
        assert entry.token_id == ids[p]
        assert entry.logprob == pytest.approx(row[ids[p]].item(), abs=2e-5)
        assert entry.rank == int((row >= row[ids[p]]).sum())
        top_values, top_ids = row.topk(k)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), top_values, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-bias"])
@pytest.mark.parametrize("chunk", [2048, 7])
def test_llama_family_prompt_logprobs(llama_family_checkpoints, name, chunk):
    path, hf = llama_family_checkpoints[name]
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=chunk, kv_cache_memory="4MiB", block_size=4,
              enable_prefix_caching=True)  # fmt: skip
    ids = _prompt(45, 300)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3, ignore_eos=True)
    first, again = llm.generate({"prompt_token_ids": ids}, params), llm.generate({"prompt_token_ids": ids}, params)
    reference = _reference(hf, ids)
    assert_matches_oracle(first[0].prompt_logprobs, ids, reference, 3)
    # Asking for prompt logprobs computes every position: no prefix-cache hit, the same values.
    assert again[0].num_cached_tokens == 0
    assert [e.logprob for e in again[0].prompt_logprobs[1:]] == [e.logprob for e in first[0].prompt_logprobs[1:]]
    # Without prompt logprobs the same prompt hits the cache, and nothing is computed for them.
    plain = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2, temperature=0))[0]
    assert plain.num_cached_tokens > 0 and plain.prompt_logprobs is None
    assert llm.engine.block_pool.num_free == llm.engine.block_pool.num_blocks


@pytest.mark.parametrize("chunk", [2048, 5])
def test_qwen3_5_prompt_logprobs(tmp_path, chunk):
    hf = _build("dense", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", max_num_batched_tokens=chunk, kv_cache_memory="8MiB", max_model_len=256)
    ids = _prompt(30, 512)
    output = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert_matches_oracle(output.prompt_logprobs, ids, _reference(hf, ids), 0)


def test_n_choices_through_generate(llama_family_checkpoints):
    """n > 1 runs n engine requests whose seeds are seed + j (vLLM V1): choice j of a seeded n-request
    is the seed + j single request; the choices differ; prompts keep their order."""
    path, _ = llama_family_checkpoints["llama-tied"]
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB")
    prompts = [{"prompt_token_ids": _prompt(9, 300, seed)} for seed in (1, 2)]
    sampled = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(prompts, sampled)
    assert [len(o.outputs) for o in outputs] == [3, 3] and [c.index for c in outputs[0].outputs] == [0, 1, 2]
    for prompt, output in zip(prompts, outputs):
        for j, choice in enumerate(output.outputs):
            alone = SamplingParams(temperature=1.0, seed=11 + j, max_tokens=12, ignore_eos=True)
            assert llm.generate(prompt, alone)[0].outputs[0].token_ids == choice.token_ids
        assert len({tuple(c.token_ids) for c in output.outputs}) == 3
    with pytest.raises(Exception, match="seed"):  # seed + j past 2^64 - 1: refused, nothing left queued
        llm.generate(prompts[0], SamplingParams(n=2, seed=2**64 - 1))
    assert not llm.engine.has_unfinished_requests()
