"""Protocol edge cases, in process: the app driven through httpx's ASGI transport (no sockets).
Every bad input gets OpenAI's error JSON with the right status, and leaves the engine idle."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from conftest import make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from fp4serve.config import EngineConfig
from fp4serve.engine.async_engine import AsyncEngine
from fp4serve.engine.engine import LLMEngine
from fp4serve.engine.grammar import xgrammar_available
from fp4serve.server import build_app
from fp4serve.server.options import ServerOptions

needs_xgrammar = pytest.mark.skipif(not xgrammar_available(), reason="xgrammar is not installed")
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "w5 w17 w42"}]


@pytest.fixture(scope="module")
def async_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-protocol")
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=256, eos_token_id=299, bos_token_id=None)  # fmt: skip
    make_checkpoint(path, config)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", max_model_len=128, kv_cache_memory="2MiB"))
    async_engine = AsyncEngine(engine)
    yield async_engine
    async_engine.shutdown()


def call(app, method: str, path: str, headers=AUTH, **kwargs) -> httpx.Response:
    async def go():
        # raise_app_exceptions=False: a bug shows as the 500 a client would get, which assert_error rejects
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


@pytest.fixture
def app(async_engine):
    yield build_app(async_engine, ["tiny"], KEY, ServerOptions(max_request_body_size=4096))
    engine = async_engine.engine
    assert not engine.requests and engine.block_pool.num_free == engine.block_pool.num_blocks


def assert_error(response: httpx.Response, status: int, words: str, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param != "any":
        assert error["param"] == param
    return error


def chat(app, **fields) -> httpx.Response:
    return call(
        app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2} | fields
    )


# ---- bad requests -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, words, param",
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "images are not supported by this server: LlamaForCausalLM takes text only", "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "weird"}]}]}, "'weird' are not supported",
         "messages[0].content[0]"),
        ({"messages": "hello"}, "messages", "messages"),
        ({"max_tokens": "many"}, "max_tokens", "max_tokens"),
        ({"temperature": 3.5, "top_p": 0}, "top_p", "top_p"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema",
         "response_format"),
        pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
                     "cannot be compiled into a grammar", "response_format", marks=needs_xgrammar),
        ({"response_format": {"type": "yaml"}}, "response_format", "response_format.type"),
        ({"logit_bias": {"5": 10}}, "logit_bias is not supported", "logit_bias"),
        ({"guided_json": {"type": "object"}}, "constrained decoding", "guided_json"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, '"auto" tool choice requires', "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "cannot be combined", "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "'g', which is not in tools", "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice requires tools", "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "tools[0].function"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
         "tool call arguments are not valid JSON", "messages[0].tool_calls[0].function.arguments"),
        ({"max_tokens": 128}, "maximum context length is 128 tokens", None),
        ({"seed": 2**70}, "seed must be in", "seed"),
        ({"messages": []}, "messages: List should have at least 1 item", "messages"),
        ({"chat_template_kwargs": {"continue_final_message": True}}, "cannot render", "messages"),
        ({"chat_template_kwargs": {"messages": []}}, "cannot render", "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "needs a string `text`",
         "messages[0].content[0].text"),
    ],
)  # fmt: skip
def test_bad_chat_request(app, fields, words, param):
    assert_error(chat(app, **fields), 400, words, param)


# Each probe that once passed validation and then broke the engine step, or answered 500.
@pytest.mark.parametrize(
    "body, param",
    [
        (b'"temperature": NaN', "temperature"),
        (b'"temperature": Infinity', "temperature"),
        (b'"repetition_penalty": NaN', "repetition_penalty"),
        (b'"temperature": 1e39, "min_tokens": 1', "temperature"),
        (b'"repetition_penalty": 1e-30', "repetition_penalty"),
        (b'"stop_token_ids": [1000000]', "stop_token_ids"),
        (b'"stop_token_ids": [1180591620717411303424]', "stop_token_ids[0]"),
        (b'"stop_token_ids": [true]', "stop_token_ids[0]"),
        (b'"stop_token_ids": [-1]', "stop_token_ids[0]"),
        (b'"max_tokens": true', "max_tokens"),
        (b'"top_k": 1180591620717411303424', "top_k"),
        (b'"temperature": "0.5"', "temperature"),
        (b'"messages": [{"role": "user", "content": "hi", "tool_calls": 5}]', "messages[0].tool_calls"),
        (b'"messages": [{"role": "user", "content": "hi", "tool_calls": [true]}]', "messages[0].tool_calls[0]"),
        (b'"messages": [{"role": "user", "content": "hi", "name": 1.5}]', "messages[0].name"),
        (b'"messages": [{"role": "user", "content": [{"type": []}]}]', "messages[0].content[0].type"),
        (b'"messages": [{"role": "user", "content": [5]}]', "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_malformed_fields_are_400_naming_the_field(app, body, param):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, ' + body + b"}"
    response = call(
        app, "POST", "/v1/chat/completions", headers=AUTH | {"Content-Type": "application/json"}, content=raw
    )
    assert_error(response, 400, "", param)


def test_tokenizer_routes_refuse_malformed_fields(app):
    bad_part = {"messages": [{"role": "user", "content": [{"type": []}]}]}
    assert_error(call(app, "POST", "/tokenize", json=bad_part), 400, "", "messages[0].content[0].type")
    assert_error(call(app, "POST", "/tokenize", json={"messages": []}), 400, "at least 1 item", "messages")
    assert_error(call(app, "POST", "/detokenize", json={"tokens": [True, False]}), 400, "valid integer", "tokens[0]")
    assert_error(call(app, "POST", "/detokenize", json={"tokens": [-1]}), 400, "", "tokens[0]")


def test_completion_prompt_ids_are_strict(app):
    post = lambda prompt: call(
        app, "POST", "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2}
    )
    assert_error(post([1, True]), 400, "", "prompt[1]")
    assert_error(post([1, 300]), 400, "out of the vocabulary", "prompt")


def test_invalid_json_has_no_param(app):
    response = call(app, "POST", "/v1/completions", headers=AUTH | {"Content-Type": "application/json"},
                    content=b'{"model": "tiny", "prompt": "w1",,}')  # fmt: skip
    error = assert_error(response, 400, "not a JSON object")
    assert error["param"] is None


def test_a_bug_is_an_internal_error_with_an_id(app, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("secret detail at /srv/fp4serve/server/tokenize.py")

    monkeypatch.setattr("fp4serve.server.app.detokenize", broken)
    error = assert_error(call(app, "POST", "/detokenize", json={"tokens": [1]}), 500, "internal error (request id ")
    assert "secret" not in error["message"] and error["param"] is None
    error_id = error["message"].removeprefix("internal error (request id ").removesuffix(")")
    assert any(error_id in r.getMessage() and "secret detail" in r.getMessage() for r in caplog.records)


@needs_xgrammar
def test_grammar_errors_carry_no_source_path(app):
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    error = assert_error(chat(app, response_format=schema), 400, "nonsense", "response_format")
    assert ".cc:" not in error["message"] and "/" not in error["message"]


def test_openapi_lists_the_statuses_sent(app):
    schema = call(app, "GET", "/openapi.json").json()
    assert "422" not in json.dumps(schema["paths"]) and "HTTPValidationError" not in json.dumps(schema)
    chat_op = schema["paths"]["/v1/chat/completions"]["post"]
    assert set(chat_op["responses"]) == {"200", "400", "401", "404", "413", "500", "503"}
    assert chat_op["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert set(schema["paths"]["/detokenize"]["post"]["responses"]) == {"200", "400", "401", "404", "413", "500"}
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert request["messages"]["minItems"] == 1
    assert {"minimum": 0, "maximum": 100}.items() <= request["temperature"]["anyOf"][0].items()
    assert schema["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]["minimum"] == 0


def test_ignored_and_accepted_fields(app):
    # Informational OpenAI fields are accepted; so are "off" values of unsupported ones.
    response = chat(app, user="u1", store=False, logit_bias={}, echo=False, response_format={"type": "text"},
                    tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none")  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["tool_calls"] == []


def test_completions_bad_requests(app):
    post = lambda body: call(app, "POST", "/v1/completions", json={"model": "tiny"} | body)
    assert_error(chat(app, echo=True), 400, "echo is not supported for chat completions", "echo")
    assert_error(post({"prompt": "w1", "best_of": 3}), 400, "best_of", "best_of")
    assert_error(post({"prompt": [[5, 6], []]}), 400, "empty", "prompt[1]")
    assert_error(post({"prompt": ["w1"] * 600, "n": 2}), 400, "1200 choices (600 prompts x n=2)", "prompt")
    assert_error(post({"prompt": "w1", "n": 1025}), 400, "n must be in [1, 1024]", "n")
    assert_error(post({"prompt": "w1", "max_tokens": 0}), 400, "max_tokens must be in [1", "max_tokens")
    assert_error(post({"prompt": "w1", "prompt_logprobs": 1, "stream": True}), 400, "not available when stream",
                 "prompt_logprobs")  # fmt: skip
    assert_error(post({"prompt": "w1", "prompt_logprobs": 21}), 400, "prompt_logprobs must be in [0, 20]", "prompt_logprobs")
    assert_error(post({"prompt": []}), 400, "empty", "prompt")
    assert_error(post({"prompt": {"text": "w1"}}), 400, "prompt", "prompt")
    assert_error(post({"prompt": "w1", "model": "gpt-4"}), 404, "does not exist", "model")
    for body in (b'{"prompt": ', b"[1, 2]", b"\xff\xfe"):
        for headers in (AUTH, AUTH | {"Content-Type": "application/json"}):
            assert_error(call(app, "POST", "/v1/completions", headers=headers, content=body), 400, "not a JSON object")


def test_body_size_limit(app):
    big = {"model": "tiny", "prompt": "w1 " * 2000}
    assert_error(call(app, "POST", "/v1/completions", json=big), 413, "larger than the limit of 4096 bytes")

    async def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"w1 " * 30
        yield b'"}'

    assert_error(call(app, "POST", "/v1/completions", content=chunks()), 413, "larger than the limit")


@pytest.fixture
def blocked_engine(async_engine, monkeypatch):
    """The engine with its step held until the returned event is set: requests pile up waiting."""
    engine = async_engine.engine
    release = threading.Event()
    real_step = engine.step

    def blocked_step():
        release.wait(30)
        return real_step()

    monkeypatch.setattr(engine, "step", blocked_step)
    yield release
    release.set()


def post_concurrently(app, async_engine, release, num_admitted: int, num_more: int) -> list[httpx.Response]:
    """Send `num_admitted` requests and wait until they all wait in the engine, then `num_more`;
    let the engine run once those are answered (refused) or have joined the others."""
    body = {"model": "tiny", "prompt": "w1 w2", "max_tokens": 2}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            admitted = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(num_admitted)]
            while async_engine.num_waiting() < num_admitted:
                await asyncio.sleep(0.01)
            more = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(num_more)]
            await asyncio.wait(more, timeout=0.5)
            release.set()
            return await asyncio.gather(*admitted, *more)

    return asyncio.run(go())


def test_max_queue_answers_503_with_retry_after(async_engine, blocked_engine, monkeypatch):
    """With every sequence slot taken, requests beyond --max-queue waiting ones are refused, not queued."""
    monkeypatch.setattr(async_engine.engine.scheduler, "max_num_seqs", 1)
    app = build_app(async_engine, ["tiny"], None, ServerOptions(max_queue=1))
    # The first takes the one slot, the second is the one queued request, the third is refused.
    first, second, refused = post_concurrently(app, async_engine, blocked_engine, 2, 1)
    assert first.status_code == second.status_code == 200
    assert_error(refused, 503, "requests are already waiting")
    assert refused.headers["retry-after"] == "1"


def test_max_queue_does_not_count_requests_with_a_free_slot(async_engine, blocked_engine):
    """A burst at an idle server fits its free sequence slots: none of it waits, none is refused."""
    app = build_app(async_engine, ["tiny"], None, ServerOptions(max_queue=1))
    responses = post_concurrently(app, async_engine, blocked_engine, 6, 2)
    assert [r.status_code for r in responses] == [200] * 8


def test_max_queue_counts_each_choice(async_engine, monkeypatch):
    """Each choice (prompts x n) is an engine request: one that could never fit the free slots and
    the queue together is a 400; one that would overfill the queue now is a 503."""
    monkeypatch.setattr(async_engine.engine.scheduler, "max_num_seqs", 1)
    app = build_app(async_engine, ["tiny"], None, ServerOptions(max_queue=1))
    post = lambda body: call(app, "POST", "/v1/completions", json={"prompt": "w1", "max_tokens": 1} | body)
    assert_error(post({"n": 3}), 400, "with --max-queue 1 and --max-num-seqs 1 the server takes at most 2", "n")
    assert_error(post({"prompt": ["w1", "w2", "w3"]}), 400, "asks for 3 choices", "prompt")
    monkeypatch.setattr(async_engine, "num_waiting", lambda: 1)  # one request already waits for the slot
    assert_error(post({"n": 2}), 503, "requests are already waiting")
    monkeypatch.undo()
    assert post({"n": 2}).status_code == 200


# ---- auth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                     ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics")],
)  # fmt: skip
def test_protected_routes_need_the_key(app, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = call(app, method, path, headers=headers, **({"json": {}} if method == "POST" else {}))
        assert_error(response, 401, "API key")
        assert response.headers["www-authenticate"] == "Bearer"


def test_auth_scheme_is_case_insensitive(app):
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert call(app, "GET", "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert_error(call(app, "GET", "/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401, "API key")


def test_open_routes(app):
    assert call(app, "GET", "/health", headers={}).status_code == 200
    version = call(app, "GET", "/version", headers={})
    assert version.status_code == 200 and version.json()["version"]
    assert_error(call(app, "GET", "/v2/nothing"), 404, "Invalid URL (GET /v2/nothing)")


# ---- tokenize / detokenize ----------------------------------------------------------------------
def test_tokenize_and_detokenize(app, async_engine):
    tokenizer = async_engine.tokenizer
    response = call(app, "POST", "/tokenize", json={"model": "tiny", "prompt": "w3 w1 w4", "return_token_strs": True})
    assert response.json() == {"count": 3, "max_model_len": 128, "tokens": [3, 1, 4], "token_strs": ["w3", "w1", "w4"]}

    chat_tokens = call(app, "POST", "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat_tokens == tokenizer(rendered, add_special_tokens=False).input_ids

    assert call(app, "POST", "/detokenize", json={"tokens": [3, 1, 4]}).json() == {"prompt": "w3 w1 w4"}
    assert_error(call(app, "POST", "/detokenize", json={"tokens": [1, 300]}), 400, "out of the vocabulary", "tokens")
    assert_error(call(app, "POST", "/tokenize", json={}), 400, "exactly one of")
    assert_error(call(app, "POST", "/tokenize", json={"prompt": "w1", "model": "x"}), 404, "does not exist")


def test_tokenizer_info_is_served_only_when_enabled(app, async_engine):
    """GET /tokenizer_info is what lm-eval's remote tokenizer reads: special tokens as text, and the
    chat template that, rendered by the client, gives what /tokenize gives for a conversation."""
    assert call(app, "GET", "/tokenizer_info").status_code == 404  # off by default, as in vLLM
    enabled = build_app(async_engine, ["tiny"], KEY, ServerOptions(enable_tokenizer_info_endpoint=True))
    assert call(enabled, "GET", "/tokenizer_info", headers={}).status_code == 401
    info = call(enabled, "GET", "/tokenizer_info").json()
    tokenizer = async_engine.tokenizer
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["eos_token"] == tokenizer.eos_token
    assert info["chat_template"] == tokenizer.chat_template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    rendered = (
        ImmutableSandboxedEnvironment()
        .from_string(info["chat_template"])
        .render(
            messages=MESSAGES, add_generation_prompt=True, **{k: v for k, v in info.items() if k.endswith("_token")}
        )
    )
    chat_tokens = call(enabled, "POST", "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert tokenizer(rendered, add_special_tokens=False).input_ids == chat_tokens


def test_chat_with_tools_renders_them_into_the_prompt(app):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    messages = MESSAGES + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "w1"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "w9"},
    ]  # fmt: skip
    response = call(app, "POST", "/tokenize", json={"messages": messages, "tools": tools})
    assert response.status_code == 200, response.text
    assert chat(app, messages=messages, tools=tools, tool_choice="none").status_code == 200


def test_stream_is_openai_sse(app):
    response = chat(app, stream=True, stream_options={"include_usage": True}, max_tokens=3, ignore_eos=True)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    for chunk in chunks[1:-1]:  # a delta carries only what it adds
        assert set(chunk["choices"][0]["delta"]) <= {"content"}


# ---- no input makes a 500 -----------------------------------------------------------------------
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
CHAT_FIELDS = ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
               "stop", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
               "stream", "stream_options", "chat_template_kwargs", "tools", "tool_choice", "response_format",
               "ignore_eos", "skip_special_tokens", "min_tokens", "stop_token_ids", "model"]  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.dictionaries(st.sampled_from(CHAT_FIELDS), JSON, max_size=3))
def test_no_chat_input_is_a_server_error(app, overrides):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2} | overrides
    response = call(app, "POST", "/v1/chat/completions", json=body)
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code != 200:
        assert_error(response, response.status_code, "")


def test_without_xgrammar_constrained_requests_are_refused(app, monkeypatch):
    monkeypatch.setattr("fp4serve.server.chat.xgrammar_available", lambda: False)
    for fields in ({"response_format": {"type": "json_object"}},
                   {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}):  # fmt: skip
        assert_error(chat(app, **fields), 400, "needs the xgrammar package on the server")


@needs_xgrammar
def test_grammar_this_vocabulary_cannot_write_ends_the_request(app):
    # The word-level test vocabulary has no token that starts a JSON object: the request stops
    # (instead of sampling from an all-masked distribution).
    response = chat(app, response_format={"type": "json_object"}, max_tokens=5)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("", "stop")
