"""Fuzzing the HTTP surface: no request, however malformed, hurts the server or another request.

Two fuzzers, both bounded and seeded (derandomize), so CI runs the same examples every time:
- schemathesis generates requests from the server's own OpenAPI document, valid and invalid, and
  checks the answers against it (status codes, content types, bodies) and that invalid data is refused;
- a mutation fuzz takes well-formed requests to every endpoint that reads a body and sets fields
  (at any depth) to hostile values: NaN, Infinity, huge or negative integers, booleans, wrong types.
  Invariants: no 5xx, every error is OpenAI's error JSON, the same connection then serves a
  well-formed request, and a stream running alongside completes.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import httpx
import pytest
import schemathesis
from conftest import make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import Server
from schemathesis import GenerationMode, checks
from transformers import LlamaConfig

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import LLMEngine
from fp4serve.server import build_app

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
VOCAB = 300
FUZZ = settings(
    max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-fuzz")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         eos_token_id=VOCAB - 1, bos_token_id=None)  # fmt: skip
    make_checkpoint(path, config)
    # A short context keeps every generation the fuzzers ask for short.
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", max_model_len=64, kv_cache_memory="2MiB"))
    server = Server(engine, ["tiny"], KEY)
    yield server
    server.stop()


@pytest.fixture
def server(live, caplog):
    yield live
    live.wait_idle()
    failures = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not failures, f"the server logged errors: {failures[:3]}"


# ---- schemathesis -------------------------------------------------------------------------------
# positive_data_acceptance is left out: schema-valid requests the server rightly refuses exist
# (an id past the vocabulary, n past the choice bound, tool_choice without tools), and the schema cannot say so.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


def naming_the_served_model(case):
    """A valid request with a random model name only ever meets the 404; this one reaches the engine."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"
    return case


def test_the_server_keeps_to_its_openapi_document(server):
    # The app over the live server's engine, driven in process by schemathesis' ASGI client. Its
    # strategies are used directly: its pytest plugin does not run on this pytest.
    api = schemathesis.openapi.from_asgi("/openapi.json", build_app(server.async_engine, ["tiny"], KEY))
    for result in api.get_all_operations():
        operation = result.ok()
        positive = operation.as_strategy(GenerationMode.POSITIVE).map(naming_the_served_model)
        cases = positive | operation.as_strategy(GenerationMode.NEGATIVE)

        @settings(max_examples=6, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=cases)
        def answers_as_documented(case):
            response = case.call(headers=AUTH)
            case.validate_response(response, checks=CHECKS, headers=AUTH)

        answers_as_documented()


# ---- mutation fuzz ------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [
    {"role": "system", "content": "w1"},
    {"role": "user", "content": [{"type": "text", "text": "w5 w6"}], "name": "u"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q": 1}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "w9"},
]  # fmt: skip
SAMPLING = {"max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "presence_penalty": 0.1,
            "frequency_penalty": 0.1, "repetition_penalty": 1.1, "seed": 3, "stop": ["w3"], "stop_token_ids": [7],
            "min_tokens": 1, "ignore_eos": False, "stream_options": {"include_usage": True}}  # fmt: skip
WELL_FORMED = {
    "/v1/chat/completions": {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "none",
                             "logprobs": True, "top_logprobs": 1, "max_completion_tokens": 2} | SAMPLING,
    "/v1/completions": {"model": "tiny", "prompt": "w1 w2", "logprobs": 1} | SAMPLING,
    "/v1/responses": {"model": "tiny", "instructions": "w2", "max_output_tokens": 2, "temperature": 0.7, "top_p": 0.9,
                      "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                      "tool_choice": "none", "stream": False, "store": False,
                      "input": [{"role": "user", "content": [{"type": "input_text", "text": "w5"}]},
                                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"q": 1}'},
                                {"type": "function_call_output", "call_id": "c1", "output": "w9"}]},
    "/tokenize": {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "add_generation_prompt": True},
    "/detokenize": {"model": "tiny", "tokens": [1, 2, 3]},
}  # fmt: skip
# Values a field may be set to: every JSON type, and the numbers that once slipped through.
HOSTILE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e39, 1e-30, 2**70, VOCAB, 10**6, -1, True, False, 5, []]),
    st.none(), st.text(max_size=4), st.sampled_from([0, 1, 2**31, 2**63, 2**64, -(2**70), -0.0, 0.5]),
    st.floats(), st.integers(),
    st.lists(st.integers(-2, VOCAB + 1) | st.booleans(), max_size=3),
    st.sampled_from([[{"type": []}], [{"type": "text"}], [5], {}, {"type": 1}, [[1, 2]], [{}]]),
)  # fmt: skip


def paths(value, prefix=()) -> list[tuple]:
    """Every place in a JSON value a mutation can write to: each key and index, at every depth."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


def mutated(body: dict, edits: list[tuple[tuple, object]]) -> dict:
    """`body` with each edit's value written at its path; a path an earlier edit removed is skipped."""
    body = copy.deepcopy(body)
    for path, value in edits:
        *parents, last = path
        node = body
        for part in parents:
            node = _child(node, part)
        if isinstance(node, dict) or (isinstance(node, list) and isinstance(last, int) and last < len(node)):
            node[last] = value
    return body


def _child(node, part):
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


@st.composite
def hostile_requests(draw):
    route = draw(st.sampled_from(sorted(WELL_FORMED)))
    body = WELL_FORMED[route]
    # Known places, and fields the body leaves out (the model's other fields, some unknown ones).
    places = paths(body) + [(name,) for name in ("n", "logit_bias", "response_format", "chat_template_kwargs",
                                                 "stream", "prompt", "tokens", "x")]  # fmt: skip
    edits = draw(st.lists(st.tuples(st.sampled_from(places), HOSTILE), min_size=1, max_size=3))
    return route, mutated(body, edits)


def assert_openai_error(response: httpx.Response) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str)
    assert error["param"] is None or isinstance(error["param"], str)


def answer(client: httpx.Client, route: str, body: dict) -> httpx.Response:
    # json.dumps writes NaN and Infinity as bare words, which the server's JSON parser reads as floats.
    return client.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})


@pytest.fixture
def clients(server):
    """(the fuzzed client, a neighbour's): one connection each, kept across all examples, so the
    fuzzed one must stay usable after every answer."""
    one_connection = httpx.Limits(max_connections=1)
    with httpx.Client(base_url=server.base, headers=AUTH, timeout=30, limits=one_connection) as client, \
         httpx.Client(base_url=server.base, headers=AUTH, timeout=30, limits=one_connection) as neighbour:  # fmt: skip
        yield client, neighbour


@FUZZ
@given(request=hostile_requests())
def test_no_request_hurts_the_server_or_another_request(clients, request):
    client, neighbour = clients
    route, body = request
    well_formed = {"model": "tiny", "prompt": "w1 w2", "max_tokens": 4, "ignore_eos": True, "stream": True}
    with neighbour.stream("POST", "/v1/completions", json=well_formed) as stream:
        assert stream.status_code == 200
        events = stream.iter_lines()
        next(events)  # the neighbour is running in the engine while the hostile request arrives
        response = answer(client, route, body)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert_openai_error(response)
        else:  # nor does a stream it was answered with end in an error event
            assert '"error"' not in response.text, response.text
        assert [line for line in events if line][-1] == "data: [DONE]"
    follow_up = answer(client, "/v1/completions", {"model": "tiny", "prompt": "w1", "max_tokens": 1})
    assert follow_up.status_code == 200, follow_up.text
