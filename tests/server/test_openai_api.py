"""The OpenAI-compatible server, driven over real HTTP by the official `openai` client.

A real uvicorn serves the app on a free loopback port in a background thread. Most tests use a tiny
random Llama (fast; its word-level tokenizer turns any ids into text "w12 w7 ..."); one checks real
text with the embedded SmolLM2. After each test the engine must be idle with every KV block free,
so a request that errs, is aborted or loses its client cannot leak.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import openai
import pytest
from conftest import make_checkpoint
from live_server import Server
from transformers import LlamaConfig

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import LLMEngine
from fp4serve.sampling_params import SamplingParams
from fp4serve.server.prompt_work import NORMALIZER_SLACK, PromptWork, longest_token
from fp4serve.server.protocol import APIError

API_KEY = "test-key"
MAX_MODEL_LEN = 512
MESSAGES = [{"role": "user", "content": "w5 w17 w42 w99"}]
PROMPT = "w1 w2 w3 w4 w5"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=299,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    make_checkpoint(path, config)
    # The model's defaults, which requests that leave a field out must get (vLLM: --generation-config auto).
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 299, "do_sample": False}))
    engine = LLMEngine(
        EngineConfig(model=str(path), dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_memory="8MiB")
    )
    server = Server(engine, ["tiny", "tiny-alias"], API_KEY)
    yield server
    server.stop()


@pytest.fixture
def server(tiny, caplog):
    yield tiny
    tiny.wait_idle()  # every test leaves no request and no KV block behind
    crashes = [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.name.startswith("uvicorn") and r.levelno >= logging.ERROR
    ]
    assert not crashes, f"the app raised: {crashes}"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)


def stream_text(chunks) -> tuple[str, str | None, openai.types.CompletionUsage | None]:
    """(joined text, finish_reason, usage) of a completions or chat stream."""
    text, finish, usage = "", None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += (choice.delta.content or "") if hasattr(choice, "delta") else choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


def assert_healthy(server: Server, client: openai.OpenAI) -> None:
    """A failed request leaves the server serving and the engine empty."""
    assert httpx.get(f"{server.base}/health").status_code == 200
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    server.wait_idle()


# ---- endpoints ----------------------------------------------------------------------------------
def test_health_and_models(server, client):
    assert httpx.get(f"{server.base}/health").status_code == 200  # no key needed
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-alias"]
    assert models.data[0].max_model_len == MAX_MODEL_LEN


def test_completion_stream_equals_non_stream(server, client):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**args)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.model == "tiny"
    assert choice.finish_reason == "length" and choice.text
    assert whole.usage.prompt_tokens == 5  # one word-level token per word, no BOS
    assert whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == 29

    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text, finish, usage = stream_text(chunks)
    assert (text, finish) == (choice.text, "length")
    assert usage == whole.usage
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])


def test_chat_stream_equals_non_stream(server, client):
    args = {
        "model": "tiny-alias",
        "messages": MESSAGES,
        "max_completion_tokens": 20,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(**args)
    message = whole.choices[0].message
    assert whole.object == "chat.completion" and whole.model == "tiny-alias"
    assert message.role == "assistant" and message.content
    tokenizer = server.engine.tokenizer
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_len, 20)

    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text, finish, usage = stream_text(chunks)
    assert (text, finish) == (message.content, "length")
    assert usage == whole.usage


def test_defaults_come_from_generation_config(server, client):
    # generation_config.json says do_sample=false: a request without temperature is greedy.
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    greedy = client.completions.create(**args, temperature=0).choices[0].text
    assert client.completions.create(**args).choices[0].text == greedy


def test_stop_strings(server, client):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**args).choices[0].text
    stop = " " + text.split()[6]  # a word some way into the greedy text
    cut = text.index(stop)

    stopped = client.completions.create(**args, stop=[stop, "never appears"]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (text[:cut], "stop")
    assert stopped.model_extra["stop_reason"] == stop
    streamed, finish, _ = stream_text(client.completions.create(**args, stop=stop, stream=True))
    assert (streamed, finish) == (text[:cut], "stop")

    included = client.completions.create(
        **{**args, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}, stop=stop
    )
    assert included.choices[0].text == text[: cut + len(stop)]


def test_seed_reproducibility(server, client):
    args = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 24,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    first = client.chat.completions.create(**args, seed=1234).choices[0].message.content
    assert client.chat.completions.create(**args, seed=1234).choices[0].message.content == first
    assert client.chat.completions.create(**args, seed=4321).choices[0].message.content != first


def test_logprobs(server, client):
    chat = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen token is the most likely
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)

    completion = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) == 2 and max(top.values()) <= 0 for top in logprobs.top_logprobs)


# ---- errors -------------------------------------------------------------------------------------
def assert_openai_error(error: openai.APIStatusError, status: int, words: str) -> None:
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert words in body["error"]["message"]


@pytest.mark.parametrize(
    "request_args, status, words",
    [
        ({"n": 0}, 400, "n must be in [1, 1024], got 0"),
        ({"extra_body": {"echo": True}}, 400, "echo is not supported for chat completions"),
        ({"model": "no-such-model"}, 404, "does not exist"),
        ({"temperature": -1}, 400, "temperature"),
        ({"max_tokens": MAX_MODEL_LEN}, 400, f"This model's maximum context length is {MAX_MODEL_LEN} tokens."),
        ({"logprobs": False, "top_logprobs": 2}, 400, "top_logprobs"),
    ],
)
def test_bad_chat_requests(server, client, request_args, status, words):
    args = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4} | request_args
    for stream in (False, True):  # a streamed request fails the same way, before it streams
        with pytest.raises(openai.APIStatusError) as error:
            client.chat.completions.create(**args, stream=stream)
        assert_openai_error(error.value, status, words)
    assert_healthy(server, client)


def test_prompt_longer_than_context(server, client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt=" ".join(["w7"] * MAX_MODEL_LEN))
    assert_openai_error(error.value, 400, f"maximum context length is {MAX_MODEL_LEN} tokens. However, you requested")
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt=[5, 6, 999], max_tokens=3)  # id outside the vocabulary
    assert_openai_error(error.value, 400, "out of the vocabulary")
    assert_healthy(server, client)


def test_bad_api_key(server):
    for key in ("wrong-key", ""):
        client = openai.OpenAI(base_url=server.url, api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            client.models.list()
        assert_openai_error(error.value, 401, "API key")
    response = httpx.post(f"{server.url}/completions", json={"model": "tiny", "prompt": "w1"})  # no header at all
    assert response.status_code == 401


def test_malformed_request_is_openai_400(server, client):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{server.url}/chat/completions", json={"model": "tiny"}, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    response = httpx.post(f"{server.url}/completions", content=b"{not json", headers=headers)
    assert response.status_code == 400 and "error" in response.json()
    assert_healthy(server, client)


def test_engine_failure_fails_the_request_not_the_server(server, client, monkeypatch):
    real_step = server.engine.step
    failing_calls = set()
    calls = 0

    def step():
        nonlocal calls
        calls += 1
        if calls in failing_calls:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    monkeypatch.setattr(server.engine, "step", step)
    failing_calls.add(calls + 1)  # the request's first step
    with pytest.raises(openai.InternalServerError) as error:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8)
    # The client learns an id to quote, not the failure: that goes to the server log.
    assert_openai_error(error.value, 500, "internal error (request id ")
    assert "simulated" not in error.value.response.text
    assert_healthy(server, client)

    failing_calls.add(calls + 3)  # mid-stream: the status line is sent, so the error comes as an event
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, stream=True)
    with pytest.raises(openai.APIError, match=r"internal error \(request id "):
        list(stream)
    assert_healthy(server, client)


def test_a_request_the_engine_fails_on_fails_alone(server, client, monkeypatch):
    """An exception in one request's sampling: that request alone gets a 500 "internal error"
    (its exception text stays in the log), a stream running beside it ends as it would have alone,
    and /metrics counts it under finished_reason="error"."""
    import fp4serve.engine.engine as engine_module

    def completion(prompt, max_tokens, stream):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         stream=stream, extra_body={"ignore_eos": True})  # fmt: skip

    alone, _, _ = stream_text(completion(PROMPT, 400, stream=True))
    sample = engine_module.sample

    failing_batches = []

    def sample_failing_for_w7(logits, rows):
        if any(row.prompt_token_ids[0] == 7 for row in rows):
            failing_batches.append(len(rows))
            raise RuntimeError("simulated sampler bug")
        return sample(logits, rows)

    monkeypatch.setattr(engine_module, "sample", sample_failing_for_w7)
    errors = ("vllm:request_success_total", (("finished_reason", "error"),))
    errors_before = scrape(server)[errors]
    beside = completion(PROMPT, 400, stream=True)
    first = next(iter(beside))
    with pytest.raises(openai.InternalServerError) as error:
        completion("w7 w8 w9", 8, stream=False)
    assert_openai_error(error.value, 500, "internal error")
    assert "simulated" not in error.value.response.text
    text, finish, _ = stream_text(beside)
    assert (first.choices[0].text + text, finish) == (alone, "length")
    assert max(failing_batches) == 2  # the two requests did share the step that failed
    assert scrape(server)[errors] == errors_before + 1
    assert_healthy(server, client)


def test_async_engine_generate(server):
    """The engine-level contract the server is built on: deltas in order, early exit aborts."""
    engine = server.async_engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def collect(request_id: str, stop_after: int | None = None) -> list:
        outputs = []
        async for output in engine.generate({"prompt_token_ids": [1, 2, 3]}, params, request_id):
            outputs.append(output)
            if len(outputs) == stop_after:
                break
        return outputs

    outputs = asyncio.run(collect("whole"))
    assert len(outputs) == 10 and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert "".join(o.delta_text for o in outputs) == outputs[-1].outputs[0].text
    assert [t for o in outputs for t in o.delta_token_ids] == outputs[-1].outputs[0].token_ids

    params.max_tokens = 400
    assert len(asyncio.run(collect("left-early", stop_after=2))) == 2
    server.wait_idle()  # closing the generator aborted the request

    async def abort_after_first_output() -> list:
        outputs = []
        async for output in engine.generate({"prompt_token_ids": [4, 5]}, params, "aborted"):
            outputs.append(output)
            if len(outputs) == 1:
                await engine.abort("aborted")
        return outputs

    outputs = asyncio.run(abort_after_first_output())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert len(outputs[-1].outputs[0].token_ids) < 400


# ---- aborts and concurrency ---------------------------------------------------------------------
@pytest.fixture
def recorded_aborts(server, monkeypatch):
    """What engine.abort_request returned for each call (an output only if the request was live),
    and the free KV blocks right after it."""
    aborts = {}
    real_abort = server.engine.abort_request

    def abort(request_id):
        output = real_abort(request_id)
        aborts[request_id] = output
        aborts.setdefault("free_blocks_after", []).append(server.engine.block_pool.num_free)
        return output

    monkeypatch.setattr(server.engine, "abort_request", abort)
    return aborts


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_closed_stream_aborts_the_request(server, client, recorded_aborts, endpoint):
    args = {"model": "tiny", "max_tokens": 400, "stream": True, "extra_body": {"ignore_eos": True}}
    if endpoint == "chat":
        stream = client.chat.completions.create(messages=MESSAGES, **args)
    else:
        stream = client.completions.create(prompt=PROMPT, **args)
    pool = server.engine.block_pool
    chunks = iter(stream)
    first = next(chunks)
    if endpoint == "chat":
        next(chunks)  # the role chunk goes out before the engine has scheduled the request
    assert pool.num_free < pool.num_blocks  # the request holds KV blocks while it streams
    stream.close()
    server.wait_idle()
    assert recorded_aborts[first.id].outputs[0].finish_reason == "abort"
    # The abort itself gave every block back: the cache is at its idle value before any further step.
    assert recorded_aborts["free_blocks_after"] == [pool.num_blocks]


def test_client_gone_aborts_non_streaming_request(server, recorded_aborts, monkeypatch):
    real_step = server.engine.step

    def slow_step():  # 400 tokens take >= 2 s: the client's 0.3 s timeout always comes first
        time.sleep(0.005)
        return real_step()

    monkeypatch.setattr(server.engine, "step", slow_step)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/completions", json=body, headers=headers, timeout=0.3)
    server.wait_idle()
    [output] = [value for key, value in recorded_aborts.items() if key != "free_blocks_after"]
    assert output.outputs[0].finish_reason == "abort"
    assert recorded_aborts["free_blocks_after"] == [server.engine.block_pool.num_blocks]


def test_concurrent_streams_all_complete(server, client, monkeypatch):
    """16 streams at once: each one's text equals what the same request gives alone."""
    prompts = [f"w{i} w{i + 1} w{2 * i + 7}" for i in range(16)]
    args = {"model": "tiny", "max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = [client.completions.create(prompt=p, **args).choices[0].text for p in prompts]

    peak = 0  # the most requests the engine held at once: they must really have run together
    real_step = server.engine.step

    def step():
        nonlocal peak
        peak = max(peak, len(server.engine.requests))
        return real_step()

    monkeypatch.setattr(server.engine, "step", step)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str, int]:
        stream = await client.completions.create(
            prompt=prompt, stream=True, stream_options={"include_usage": True}, **args
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish, usage.completion_tokens

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60) as streams:
            return await asyncio.gather(*(one(streams, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert [(finish, n) for _, finish, n in results] == [("length", 24)] * 16
    assert [text for text, _, _ in results] == alone
    assert peak > 8


# ---- metrics ------------------------------------------------------------------------------------
def scrape(server) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own parser: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server.base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[(sample.name, labels)] = sample.value
    return samples


def test_metrics_count_what_was_served(server, client):
    before = scrape(server)
    replies = [
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=n, extra_body={"ignore_eos": True})
        for n in (1, 5, 9)
    ]
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    stream.close()  # an aborted request
    server.wait_idle()
    after = scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    generated = sum(r.usage.completion_tokens for r in replies)
    assert delta("vllm:request_success_total", finished_reason="length") == 3
    assert delta("vllm:request_success_total", finished_reason="abort") == 1
    assert delta("vllm:generation_tokens_total") >= generated + 1  # + what the aborted stream got
    assert delta("vllm:prompt_tokens_total") == 4 * replies[0].usage.prompt_tokens
    assert delta("vllm:time_to_first_token_seconds_count") == 4
    assert delta("vllm:e2e_request_latency_seconds_count") == 4
    # one inter-token interval per token after the first
    assert delta("vllm:inter_token_latency_seconds_count") == delta("vllm:generation_tokens_total") - 4
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0
    assert (
        after[("vllm:e2e_request_latency_seconds_bucket", (("le", "+Inf"),))]
        == after[("vllm:e2e_request_latency_seconds_count", ())]
    )
    assert after[("vllm:num_requests_running", ())] == after[("vllm:num_requests_waiting", ())] == 0
    assert after[("vllm:kv_cache_usage_perc", ())] == 0
    assert not any(name.startswith(("vllm:spec_decode", "fp4serve:spec_decode")) for name, _ in after)  # no drafting


def test_prefix_cache_metrics(server, client):
    prompt = " ".join(f"w{i}" for i in range(40, 80))  # 40 tokens: two full 16-token blocks
    before = scrape(server)
    for _ in range(2):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    after = scrape(server)
    queries = after[("vllm:prefix_cache_queries_total", ())] - before[("vllm:prefix_cache_queries_total", ())]
    hits = after[("vllm:prefix_cache_hits_total", ())] - before[("vllm:prefix_cache_hits_total", ())]
    assert (queries, hits) == (64, 32)  # the second request found both blocks of the first


def test_spec_decoding_metrics(server, monkeypatch):
    from fp4serve.spec_decode.acceptance_watch import AcceptanceWatch
    from fp4serve.spec_decode.metrics import SpecDecodingStats

    spec, watch = SpecDecodingStats(num_speculative_tokens=3), AcceptanceWatch("mtp", window_draft_tokens=5)
    for i, (drafted, accepted) in enumerate([(3, 2), (3, 3), (2, 0)]):
        spec.observe(drafted, accepted)
        watch.observe(f"r{i}", drafted, accepted, prompt_len=10, greedy=True)
    monkeypatch.setattr(server.engine, "spec_stats", spec)
    monkeypatch.setattr(server.engine, "acceptance_watch", watch)
    samples = scrape(server)
    # the window: the last verifications holding 5 draft tokens (3 + 0 of 5); before it, 2 of 3
    assert samples[("fp4serve:spec_decode_acceptance_rate_recent", (("method", "mtp"),))] == 3 / 5
    assert samples[("fp4serve:spec_decode_acceptance_rate_running", (("method", "mtp"),))] == 2 / 3
    assert samples[("vllm:spec_decode_num_drafts_total", ())] == 3
    assert samples[("vllm:spec_decode_num_draft_tokens_total", ())] == 8
    assert samples[("vllm:spec_decode_num_accepted_tokens_total", ())] == 5
    per_position = [
        samples[("vllm:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(i)),))] for i in range(3)
    ]
    assert per_position == [2, 2, 1]


# ---- real text ----------------------------------------------------------------------------------
def test_smollm2_answers(smollm2_path):
    engine = LLMEngine(
        EngineConfig(model=str(smollm2_path), dtype="float32", max_model_len=256, kv_cache_memory="32MiB")
    )
    server = Server(engine, ["smollm2"], api_key=None)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        args = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        }
        answer = client.chat.completions.create(**args).choices[0].message.content
        assert "Paris" in answer
        streamed, finish, _ = stream_text(client.chat.completions.create(**args, stream=True))
        assert streamed == answer and finish in ("stop", "length")
        server.wait_idle()
    finally:
        server.stop()


# ---- prompt work off the event loop ---------------------------------------------------------------
class RecordingTokenizer:
    """The server's tokenizer, noting the thread of every encode."""

    def __init__(self, inner):
        self.inner, self.threads = inner, []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_prompts_are_tokenized_on_worker_threads(server, client, monkeypatch):
    recording = RecordingTokenizer(server.engine.tokenizer)
    monkeypatch.setattr(server.engine, "tokenizer", recording)
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    httpx.post(f"{server.base}/tokenize", json={"prompt": PROMPT}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert len(recording.threads) == 2
    assert all(name.startswith("fp4serve-prompt") for name in recording.threads), recording.threads


@pytest.mark.parametrize("route", ["completions", "chat", "tokenize"])
def test_an_oversized_prompt_is_refused_before_tokenizing(server, client, monkeypatch, route):
    recording = RecordingTokenizer(server.engine.tokenizer)
    monkeypatch.setattr(server.engine, "tokenizer", recording)
    limit = MAX_MODEL_LEN * longest_token(recording) * NORMALIZER_SLACK
    text = "w7 " * (limit // 3 + 1)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if route == "completions":
        response = httpx.post(f"{server.url}/completions", json={"model": "tiny", "prompt": text}, headers=headers)
    elif route == "chat":
        body = {"model": "tiny", "messages": [{"role": "user", "content": text}]}
        response = httpx.post(f"{server.url}/chat/completions", json=body, headers=headers)
    else:
        response = httpx.post(f"{server.base}/tokenize", json={"prompt": text}, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == ("messages" if route == "chat" else "prompt")
    assert f"max_model_len {MAX_MODEL_LEN}" in error["message"]
    assert recording.threads == []  # refused before any tokenizing or templating


def test_the_length_bound_admits_every_prompt_that_fits(server):
    """The bound is sound: a text of max_model_len copies of the vocabulary's longest token
    (the most characters max_model_len tokens can stand for) passes it."""
    tokenizer = server.engine.tokenizer
    longest = max(tokenizer.get_vocab(), key=len)
    text = tokenizer.convert_tokens_to_string([longest] * MAX_MODEL_LEN)
    work = PromptWork(tokenizer, MAX_MODEL_LEN)
    work.check_length(len(text), "prompt")  # no APIError
    with pytest.raises(APIError):
        work.check_length(MAX_MODEL_LEN * len(longest) * NORMALIZER_SLACK + 1, "prompt")
    work.shutdown()


# ---- routes fp4serve does not serve ---------------------------------------------------------
def test_unknown_routes_answer_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError) as error:
        client.embeddings.create(model="tiny", input="w1 w2")
    assert error.value.body == {"message": "Invalid URL (POST /v1/embeddings)", "type": "invalid_request_error",
                                "param": None, "code": None}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for method, path in [("POST", "/v1/audio/transcriptions"), ("GET", "/v1/chat/completion"), ("DELETE", "/nope")]:
        response = httpx.request(method, f"{server.base}{path}", headers=headers)
        assert response.status_code == 404
        assert response.json()["error"]["message"] == f"Invalid URL ({method} {path})"
    response = httpx.get(f"{server.url}/chat/completions", headers=headers)
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert response.json()["error"] == {"message": "Invalid method for URL (GET /v1/chat/completions): it accepts POST",
                                        "type": "invalid_request_error", "param": None, "code": None}  # fmt: skip
