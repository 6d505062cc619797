"""Several choices per request over real HTTP with the official `openai` client: lists of prompts,
n > 1 (completions and chat), echo with prompt logprobs as lm-evaluation-harness sends and parses
them, streaming, and aborts. The server is test_openai_api's tiny random Llama; every test leaves
the engine idle with every KV block free (its `server` fixture checks)."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from test_openai_api import API_KEY, MESSAGES, PROMPT, assert_healthy, assert_openai_error, client, server, tiny  # noqa: F401
from transformers import AutoModelForCausalLM

PROMPTS = ["w1 w2 w3", "w9 w8", "w4 w40 w4 w41 w4"]
GREEDY = {"model": "tiny", "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}


def by_index(chunks) -> dict[int, list]:
    """Stream chunks -> {choice index: [its choice deltas]}, plus every chunk's usage under -1."""
    choices: dict[int, list] = {}
    for chunk in chunks:
        if chunk.usage is not None:
            choices.setdefault(-1, []).append(chunk.usage)
        for choice in chunk.choices:
            choices.setdefault(choice.index, []).append(choice)
    return choices


def test_list_of_prompts_equals_each_alone(server, client):  # noqa: F811 (fixtures)
    alone = [client.completions.create(prompt=p, **GREEDY) for p in PROMPTS]
    batch = client.completions.create(prompt=PROMPTS, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone) == 10
    assert batch.usage.completion_tokens == 24
    # Token-id prompts too, and with n the choices of prompt i are i * n .. i * n + n - 1 (vLLM's order).
    ids = [[1, 2, 3], [9, 8]]
    batch = client.completions.create(prompt=ids, n=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    texts = [c.text for c in batch.choices]
    assert texts == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (5, 32)  # prompts once, every choice


def test_n_with_seed_repeats_and_differs(server, client):  # noqa: F811 (fixtures)
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 3,
            "extra_body": {"ignore_eos": True}}  # fmt: skip
    first = [c.text for c in client.completions.create(**args).choices]
    assert [c.text for c in client.completions.create(**args).choices] == first
    assert len(set(first)) == 3
    # Choice j is the request seeded seed + j (vLLM V1's child seeds).
    single = {**args, "n": 1}
    assert [client.completions.create(**{**single, "seed": 5 + j}).choices[0].text for j in range(3)] == first

    chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 9, "n": 3,
            "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole = client.chat.completions.create(**chat)
    contents = [c.message.content for c in whole.choices]
    assert [c.index for c in whole.choices] == [0, 1, 2] and len(set(contents)) == 3
    assert whole.usage.completion_tokens == 30
    streamed = by_index(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert [streamed[i][0].delta.role for i in range(3)] == ["assistant"] * 3
    assert ["".join(c.delta.content or "" for c in streamed[i]) for i in range(3)] == contents
    assert [streamed[i][-1].finish_reason for i in range(3)] == ["length"] * 3
    assert streamed[-1] == [whole.usage]  # usage once, at the end


def test_streamed_choices_reassemble_to_the_whole_answer(server, client):  # noqa: F811 (fixtures)
    args = {"model": "tiny", "prompt": PROMPTS[:2], "max_tokens": 9, "temperature": 1.0, "seed": 3, "n": 2,
            "logprobs": 1, "extra_body": {"ignore_eos": True}}  # fmt: skip
    for echo in (False, True):
        whole = client.completions.create(**args, echo=echo)
        chunks = list(client.completions.create(**args, echo=echo, stream=True, stream_options={"include_usage": True}))
        streamed = by_index(chunks)
        assert sorted(streamed) == [-1, 0, 1, 2, 3] and streamed[-1] == [whole.usage]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        for choice in whole.choices:
            parts = streamed[choice.index]
            assert "".join(p.text for p in parts) == choice.text
            assert [p.finish_reason for p in parts][-1] == choice.finish_reason == "length"
            assert [lp for p in parts for lp in p.logprobs.token_logprobs] == choice.logprobs.token_logprobs
            assert [o for p in parts for o in p.logprobs.text_offset] == choice.logprobs.text_offset


@pytest.fixture(scope="module")
def oracle(tiny):  # noqa: F811 (fixture)
    return AutoModelForCausalLM.from_pretrained(tiny.engine.model_path, dtype=torch.float32).eval()


def test_echo_logprobs_as_lm_eval_sends_and_parses_them(server, client, oracle):  # noqa: F811 (fixtures)
    """lm-eval local-completions' loglikelihood payload (token-id prompts of context + continuation),
    then its parse_logprobs: sum of token_logprobs[ctxlen:-1], greedy if each is its top map's max."""
    contexts, continuations = [[11, 12, 13, 14], [20, 21]], [[15, 16], [22, 23, 24]]
    prompts = [c + k for c, k in zip(contexts, continuations)]
    reply = client.completions.create(model="tiny", prompt=prompts, temperature=0, max_tokens=1, logprobs=1, seed=1234,
                                      echo=True, extra_body={"prompt_logprobs": 1})  # fmt: skip
    for choice, ids, ctxlen in zip(sorted(reply.choices, key=lambda c: c.index), prompts, map(len, contexts)):
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None and choice.text.startswith(" ".join(f"w{i}" for i in ids))
        assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids) + 1)]
        with torch.no_grad():
            reference = oracle(torch.tensor([ids])).logits[0].log_softmax(dim=-1)
        expected = [reference[p - 1, ids[p]].item() for p in range(1, len(ids))]
        assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-5)
        # vLLM's prompt_logprobs field on the choice holds the same numbers, with ranks.
        prompt_logprobs = choice.model_extra["prompt_logprobs"]
        assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
        own = [prompt_logprobs[p][str(ids[p])] for p in range(1, len(ids))]
        assert [entry["logprob"] for entry in own] == logprobs.token_logprobs[1 : len(ids)]
        ranks = [int((reference[p - 1] >= reference[p - 1, ids[p]]).sum()) for p in range(1, len(ids))]
        assert [entry["rank"] for entry in own] == ranks
        # lm-eval's parse_logprobs
        scored, tops = logprobs.token_logprobs[ctxlen:-1], logprobs.top_logprobs[ctxlen:-1]
        total = sum(scored)
        greedy = all(t == max(top.values()) for t, top in zip(scored, tops))
        assert total == pytest.approx(sum(expected[ctxlen - 1 :]), abs=1e-4)
        argmax = [int(reference[p - 1].argmax()) for p in range(ctxlen, len(ids))]
        assert greedy == (argmax == ids[ctxlen:])
    # echo with max_tokens 0: the prompt alone (the engine's one sampled token is left out).
    only = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    choice = only.choices[0]
    assert choice.text == PROMPT and len(choice.logprobs.tokens) == 5 and only.usage.completion_tokens == 0


def test_chat_prompt_logprobs_and_bad_combinations(server, client):  # noqa: F811 (fixtures)
    extra = {"prompt_logprobs": 0}
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, extra_body=extra)
    prompt_logprobs = reply.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == reply.usage.prompt_tokens
    assert all(len(entry) == 1 for entry in prompt_logprobs[1:])  # the prompt token itself, k = 0
    for args, words in [
        ({"n": 0}, "n must be in [1, 1024], got 0"),
        ({"n": 5000}, "n must be in [1, 1024]"),
        ({"prompt": ["w1"] * 300, "n": 4}, "asks for 1200 choices"),
        ({"best_of": 2}, "best_of is not supported"),
        ({"extra_body": {"prompt_logprobs": 2}, "stream": True}, "not available when stream is true"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(**{"model": "tiny", "prompt": PROMPT, "max_tokens": 2, **args})
        assert_openai_error(error.value, 400, words)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=0)
    assert_openai_error(error.value, 400, "n must be in")
    assert_healthy(server, client)


def test_disconnect_and_failure_abort_every_choice(server, client, monkeypatch):  # noqa: F811 (fixtures)
    long = {"model": "tiny", "max_tokens": 400, "extra_body": {"ignore_eos": True}}
    stream = client.completions.create(prompt=PROMPTS, n=2, stream=True, **long)
    next(iter(stream))
    stream.close()  # the client goes away mid-stream: all six choices end
    server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{server.url}/chat/completions", json={**long, "messages": MESSAGES, "n": 3}, timeout=0.5,
                   headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    server.wait_idle()

    import fp4serve.engine.engine as engine_module

    sample = engine_module.sample

    def sample_failing_for_w9(logits, rows):
        if any(row.prompt_token_ids[0] == 9 for row in rows):
            raise RuntimeError("simulated sampler bug")
        return sample(logits, rows)

    monkeypatch.setattr(engine_module, "sample", sample_failing_for_w9)
    for stream in (False, True):
        with pytest.raises(openai.APIError, match=r"internal error \(request id "):
            reply = client.completions.create(prompt=PROMPTS, stream=stream, **long)
            list(reply) if stream else None
        server.wait_idle()  # the choices beside the failed one were aborted
    monkeypatch.undo()
    assert_healthy(server, client)
