"""Reasoning and tool-call parsing end to end: a real uvicorn server, the official openai client,
SmolLM2's real tokenizer (which splits <think> and <tool_call> into several tokens), and a tiny
model whose replies are scripted (scripted_model.py)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from scripted_model import script_replies, scripted_server

from fp4serve.engine.grammar import xgrammar_available
from fp4serve.server.options import ServerOptions

# A Qwen3.5-style template: it opens the think block for the model unless enable_thinking is false,
# and lists the tools in the system turn. Like SmolLM2's, it concatenates content as a string, and
# like Qwen3.5's it iterates tool-call arguments as a mapping.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function.name') | join(', ') }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] + '\n' + m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>{{ c.function.name }}"
    "{% for key, value in c.function.arguments | items %} {{ key }}={{ value }}{% endfor %}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def live(smollm2_path, tmp_path_factory):
    options = ServerOptions(reasoning_parser="qwen3", tool_call_parser="hermes", enable_auto_tool_choice=True)
    server = scripted_server(smollm2_path, tmp_path_factory.mktemp("scripted"), TEMPLATE, options)
    yield server
    server.stop()


@pytest.fixture
def say(live, monkeypatch):
    """say(text): every request's output is exactly `text`, then EOS."""
    yield script_replies(monkeypatch, live.engine.tokenizer)
    live.wait_idle()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url, api_key="unused", max_retries=0, timeout=60)


def both_ways(client, **args):
    """(whole message, finish_reason) and the same assembled from the stream."""
    whole = client.chat.completions.create(model="scripted", max_tokens=200, **args).choices[0]
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model="scripted", max_tokens=200, stream=True, **args):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            for call in delta.tool_calls or []:
                calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                calls[call.index]["name"] += call.function.name or ""
                calls[call.index]["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    streamed = (reasoning or None, content, [calls[i] for i in sorted(calls)], finish)
    return whole, streamed


def test_reasoning_opened_by_the_template(say, client):
    say("The user asks about weather. I cannot know it.\n</think>\n\nI do not know the weather in Paris.")
    whole, streamed = both_ways(client, messages=MESSAGES)
    assert whole.message.model_extra["reasoning_content"] == "The user asks about weather. I cannot know it.\n"
    assert whole.message.content == "\n\nI do not know the weather in Paris."
    assert whole.finish_reason == "stop"
    assert streamed == (whole.message.model_extra["reasoning_content"], whole.message.content, [], "stop")


def test_no_reasoning_when_thinking_is_off(say, client):
    say("It is sunny.")
    whole, streamed = both_ways(
        client, messages=MESSAGES, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert whole.message.content == "It is sunny." and whole.message.model_extra["reasoning_content"] is None
    assert streamed == (None, "It is sunny.", [], "stop")


def test_hermes_tool_call(say, client):
    call = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    say(f"I should call the tool.\n</think>\n\n<tool_call>\n{json.dumps(call)}\n</tool_call>")
    whole, streamed = both_ways(client, messages=MESSAGES, tools=[WEATHER_TOOL])
    message = whole.message
    assert whole.finish_reason == "tool_calls"
    assert message.model_extra["reasoning_content"] == "I should call the tool.\n"
    assert message.content == "\n\n"
    [tool_call] = message.tool_calls
    assert tool_call.type == "function" and tool_call.id.startswith("chatcmpl-tool-")
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == call["arguments"]
    reasoning, content, calls, finish = streamed
    assert (reasoning, content, finish) == ("I should call the tool.\n", "\n\n", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", call["arguments"])]

    # The reply goes back into the conversation as the client sends it: arguments as a JSON string.
    say("It is 21 degrees in Paris.")
    follow_up = MESSAGES + [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": "21C"},
    ]
    answer = client.chat.completions.create(model="scripted", messages=follow_up, tools=[WEATHER_TOOL],
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert answer.choices[0].message.content == "It is 21 degrees in Paris."


def test_tool_round_trip_with_null_content(live, say, client):
    """An agent's round trip as the openai SDK writes it: the assistant turn that called a tool has
    content None, then the tool's result follows."""
    say("It is 21 degrees in Paris.")
    function = {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}
    call = {"id": "call_1", "type": "function", "function": function}
    messages = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "21C"}]  # fmt: skip
    answer = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL],
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert answer.choices[0].message.content == "It is 21 degrees in Paris."
    # The template saw content "" and the arguments as a mapping.
    tokens = httpx.post(f"{live.base}/tokenize", json={"messages": messages}).json()["tokens"]
    rendered = live.engine.tokenizer.decode(tokens)
    assert "<|im_start|>assistant\n<tool_call>get_weather city=Paris days=2</tool_call><|im_end|>" in rendered

    for empty in ({"role": "assistant"}, {"role": "assistant", "content": None, "tool_calls": []}):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="scripted", messages=MESSAGES + [empty])
        assert error.value.body["message"] == "an assistant message needs content or tool_calls"
        assert error.value.body["param"] == "messages[1].content"


def test_malformed_tool_call_is_plain_content(say, client):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call> sorry'
    say(text)
    whole, streamed = both_ways(client, messages=MESSAGES, tools=[WEATHER_TOOL],
                                extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert (whole.message.content, whole.message.tool_calls, whole.finish_reason) == (text, [], "stop")
    assert streamed == (None, text, [], "stop")


def test_tool_choice_none_leaves_tool_text_alone(say, client):
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    say(text)
    whole, streamed = both_ways(client, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none",
                                extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert (whole.message.content, whole.message.tool_calls) == (text, [])
    assert streamed == (None, text, [], "stop")


# ---- constrained decoding (the real sampler, a random model: only the grammar makes it JSON) -----
needs_xgrammar = pytest.mark.skipif(not xgrammar_available(), reason="xgrammar is not installed")
FORECAST = {"type": "object", "additionalProperties": False, "required": ["city", "rain", "days"],
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "rain": {"type": "boolean"},
                           "days": {"type": "integer", "minimum": 1, "maximum": 9}}}  # fmt: skip


def assert_forecast(value) -> None:
    assert set(value) == {"city", "rain", "days"}
    assert value["city"] in ("Paris", "Oslo") and isinstance(value["rain"], bool) and 1 <= value["days"] <= 9


@needs_xgrammar
@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(live, client, stream):
    args = {"model": "scripted", "messages": MESSAGES, "max_tokens": 100, "temperature": 1.0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST}}}  # fmt: skip
    for seed in range(3):
        if stream:
            content, finish, _ = stream_chat(client.chat.completions.create(**args, seed=seed, stream=True))
        else:
            choice = client.chat.completions.create(**args, seed=seed).choices[0]
            content, finish = choice.message.content, choice.finish_reason
        assert finish == "stop"
        assert_forecast(json.loads(content))
    live.wait_idle()


@needs_xgrammar
def test_response_format_json_object(live, client):
    choice = client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=150, temperature=0,
                                            response_format={"type": "json_object"}).choices[0]  # fmt: skip
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":  # the grammar lets the model stop only once the object is complete
        assert isinstance(json.loads(choice.message.content), dict)
    live.wait_idle()


@needs_xgrammar
def test_forced_tool_choice(live, client):
    tools = [WEATHER_TOOL, {"type": "function", "function": {"name": "forecast", "parameters": FORECAST}}]
    named = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=tools, max_tokens=100, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "forecast"}})  # fmt: skip
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "forecast" and named.choices[0].finish_reason == "tool_calls"
    assert_forecast(json.loads(call.function.arguments))
    content, finish, calls = stream_chat(client.chat.completions.create(
        model="scripted", messages=MESSAGES, tools=tools, max_tokens=100, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "forecast"}}))  # fmt: skip
    assert (content, finish, [c.function.name for c in calls]) == ("", "tool_calls", ["forecast"])
    assert json.loads(calls[0].function.arguments) == json.loads(call.function.arguments)  # greedy both times

    only_forecast = [{"type": "function", "function": {"name": "forecast", "parameters": FORECAST}}]
    required = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=only_forecast,
                                              tool_choice="required", max_tokens=300, temperature=1.0, seed=3)  # fmt: skip
    choice = required.choices[0]
    if choice.finish_reason == "length":  # a random model may list calls until max_tokens: then it is plain text
        assert choice.message.tool_calls == [] and choice.message.content.startswith("[")
    else:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.function.name == "forecast"
            assert_forecast(json.loads(call.function.arguments))
    live.wait_idle()


def stream_chat(chunks) -> tuple[str, str | None, list]:
    content, finish, calls = "", None, []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return content, finish, calls


def test_each_choice_parses_its_own_reasoning_and_tool_calls(say, client):
    """n = 3: every choice runs its own reasoning and tool-call parsers (they keep state), whole and streamed."""
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    say(f"Look it up.\n</think>\n\n<tool_call>\n{json.dumps(call)}\n</tool_call>")
    args = {"model": "scripted", "messages": MESSAGES, "tools": [WEATHER_TOOL], "max_tokens": 200, "n": 3}
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.model_extra["reasoning_content"] == "Look it up.\n"
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
        assert calls == [("get_weather", {"city": "Oslo"})]
    per_choice: dict[int, list] = {}
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            per_choice.setdefault(choice.index, []).append(choice)
    assert sorted(per_choice) == [0, 1, 2]
    for parts in per_choice.values():
        reasoning = "".join((p.delta.model_extra or {}).get("reasoning_content") or "" for p in parts)
        calls = [c for p in parts for c in p.delta.tool_calls or []]
        assert reasoning == "Look it up.\n" and [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
        assert parts[-1].finish_reason == "tool_calls"


@needs_xgrammar
def test_each_choice_has_its_own_grammar(live, client):
    args = {"model": "scripted", "messages": MESSAGES, "max_tokens": 100, "temperature": 1.0, "seed": 4, "n": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST}}}  # fmt: skip
    for choice in client.chat.completions.create(**args).choices:
        assert choice.finish_reason == "stop"
        assert_forecast(json.loads(choice.message.content))
    live.wait_idle()
