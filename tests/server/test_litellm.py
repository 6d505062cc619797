"""litellm, the client many agent frameworks call models through, against a live fp4serve: chat,
streaming, a tool call and the tool-result round trip (litellm sends the assistant turn back with
`content: null` next to `tool_calls`). The replies are scripted (scripted_model.py), so the text is
known exactly. The template joins message content to strings as Qwen3.5's does, so a null content
must reach it as "" (jinja2 cannot add a missing value to a string), and it renders the tool calls."""

from __future__ import annotations

import json
import os

# litellm fetches a price table from GitHub on import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import pytest
from scripted_model import script_replies, scripted_server
from test_tools_reasoning import WEATHER_TOOL

from fp4serve.server.options import ServerOptions

CALL = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def live(smollm2_path, tmp_path_factory):
    options = ServerOptions(tool_call_parser="hermes", enable_auto_tool_choice=True)
    server = scripted_server(smollm2_path, tmp_path_factory.mktemp("scripted-litellm"), TEMPLATE, options)
    yield server
    server.stop()


@pytest.fixture
def say(live, monkeypatch):
    yield script_replies(monkeypatch, live.engine.tokenizer)
    live.wait_idle()


def complete(live, **args):
    return litellm.completion(model="openai/scripted", api_base=live.url, api_key="unused", max_tokens=100, **args)


def test_chat_and_stream(live, say):
    say("Paris is sunny today.")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = complete(live, messages=messages)
    assert reply.choices[0].message.content == "Paris is sunny today."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(live.engine.tokenizer("Paris is sunny today.").input_ids) + 1  # + EOS
    pieces = [chunk.choices[0].delta.content or "" for chunk in complete(live, messages=messages, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == "Paris is sunny today."


def test_tool_call_and_result_round_trip(live, say):
    say(f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>")
    messages = [{"role": "user", "content": "Weather in Paris for two days?"}]
    reply = complete(live, messages=messages, tools=[WEATHER_TOOL])
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL["arguments"]

    streamed = complete(live, messages=messages, tools=[WEATHER_TOOL], stream=True)
    deltas = [tool for chunk in streamed for tool in chunk.choices[0].delta.tool_calls or []]
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert deltas[0].function.name == "get_weather"

    # The agent's next turn: the assistant message as litellm returned it (content None), the result.
    assert reply.choices[0].message.content is None
    messages += [reply.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    say("Clear skies in Paris for two days.")
    final = complete(live, messages=messages, tools=[WEATHER_TOOL])
    assert final.choices[0].message.content == "Clear skies in Paris for two days."
    # The prompt the server rendered is the template's rendering of the round trip with content "".
    tokenizer = live.engine.tokenizer
    assistant = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]}
    expected = tokenizer.apply_chat_template(
        [messages[0], assistant, messages[2]], tokenize=False, add_generation_prompt=True
    )
    assert '"arguments": {"city": "Paris", "days": 2}' in expected and '{"sky": "clear"}' in expected
    assert final.usage.prompt_tokens == len(tokenizer(expected, add_special_tokens=False).input_ids)
