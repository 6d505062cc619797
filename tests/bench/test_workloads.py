"""Bundled prompt sets, users' JSONL files, random prompts and long-context padding."""

from __future__ import annotations

import json

import pytest

from fp4serve.bench.token_count import TokenCounter, estimate_counter, fit_to_tokens, local_counter
from fp4serve.bench.workloads import (
    CATEGORIES,
    category_prompts,
    long_context_prompts,
    parse_token_count,
    random_prompts,
    read_jsonl,
)
from fp4serve.errors import BenchError


def test_every_category_has_16_distinct_prompts():
    prompts = category_prompts(list(CATEGORIES))
    assert list(prompts) == list(CATEGORIES)
    for category, items in prompts.items():
        texts = [p.text for p in items]
        assert len(texts) >= 16 and len(set(texts)) == len(texts), category
        assert all(p.category == category and len(p.text) > 20 for p in items)
    with pytest.raises(BenchError, match="unknown categories.*poetry"):
        category_prompts(["coding", "poetry"])


def test_user_jsonl_groups_by_category(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"prompt": "a"}, {"prompt": "b", "category": "sql", "max_tokens": 5}, {"prompt": "c"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    groups = read_jsonl(path)
    assert [p.text for p in groups["custom"]] == ["a", "c"]
    assert groups["sql"][0].max_tokens == 5


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "ok"}\nnot json\n', "line 2: not JSON"),
        ('{"text": "no prompt"}\n', 'line 1: expected an object with a non-empty string "prompt"'),
        ('{"prompt": "x", "max_tokens": 0}\n', "line 1: max_tokens must be a positive integer"),
        ("\n\n", "has no prompts"),
    ],
)
def test_bad_jsonl_names_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BenchError, match=message):
        read_jsonl(path)
    with pytest.raises(BenchError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_parse_token_count():
    assert parse_token_count("16k") == 16384 and parse_token_count(" 512 ") == 512 and parse_token_count("1.5k") == 1536
    with pytest.raises(BenchError, match="not a token count"):
        parse_token_count("lots")


def test_fit_to_tokens_converges_on_a_different_tokenizer():
    words = TokenCounter(lambda text: len(text.split()), "words")  # ~5-6 characters a token, not 4
    text, tokens = fit_to_tokens(words, lambda n: ("lorem ipsum dolor " * 1000)[:n], 300)
    assert abs(tokens - 300) <= 6 and words.count(text) == tokens


def test_long_context_prompts_reach_the_tier_with_the_models_tokenizer(smollm2_path):
    counter = local_counter(smollm2_path)
    questions = category_prompts(["math"])["math"]
    prompts = long_context_prompts(counter, 2048, questions, count=2, seed=0)
    for (prompt, counted), question in zip(prompts, questions):
        assert prompt.text.endswith(question.text) and prompt.category == "math"
        assert counted == pytest.approx(2048, rel=0.03)
        assert counter.count(prompt.text) == pytest.approx(2048, rel=0.03)  # the whole text, counted afresh
    assert prompts[0][0].text != prompts[1][0].text  # different padding: no shared prefix to cache


def test_random_prompts_have_set_lengths(smollm2_path):
    counter = local_counter(smollm2_path)
    fixed = random_prompts(counter, 3, input_len=64, output_len=16, range_ratio=0.0, seed=1)
    assert all(p.max_tokens == 16 and p.ignore_eos for p in fixed)
    assert all(counter.count(p.text) == pytest.approx(64, abs=3) for p in fixed)
    ranged = random_prompts(estimate_counter(), 20, input_len=100, output_len=50, range_ratio=0.5, seed=2)
    assert all(25 <= p.max_tokens <= 75 for p in ranged) and len({p.max_tokens for p in ranged}) > 1
    assert random_prompts(counter, 2, 64, 16, 0.0, seed=1)[0].text == fixed[0].text  # seeded
    with pytest.raises(BenchError, match="range ratio"):
        random_prompts(counter, 1, 10, 10, range_ratio=1.5, seed=0)


def test_counter_prefers_the_servers_tokenize():
    import httpx

    from fp4serve.bench.token_count import make_counter

    def vllm(request):  # vLLM's shape: {"model", "prompt"} -> {"count", "tokens"}
        if request.url.path != "/tokenize":
            return httpx.Response(404)
        words = json.loads(request.content)["prompt"].split()
        return httpx.Response(200, json={"count": len(words), "tokens": list(range(len(words)))})

    def llama_cpp(request):  # {"content"} -> {"tokens"}; a vLLM-shaped body is an error there
        body = json.loads(request.content)
        if "content" not in body:
            return httpx.Response(400, json={"error": "content required"})
        return httpx.Response(200, json={"tokens": [0] * len(body["content"].split())})

    for handler, flavour in ((vllm, "vLLM"), (llama_cpp, "llama.cpp")):
        with httpx.Client(transport=httpx.MockTransport(handler)) as client:
            counter = make_counter(client, "http://server", "m", tokenizer=None, model_root=None)
            assert counter.method == f"server /tokenize ({flavour} shape)" and counter.count("a b c") == 3
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404))) as client:
        counter = make_counter(client, "http://server", "m", tokenizer=None, model_root="/not/here")
        assert counter.method.startswith("estimate") and counter.count("x" * 40) == 10
