"""/v1/responses (OpenAI's Responses API) driven by the official openai client, whose own types parse
every answer and whose stream helper checks the event sequence. The server is test_tools_reasoning's:
SmolLM2's real tokenizer, a Qwen3.5-style template, the qwen3 reasoning and hermes tool parsers, and
a scripted sampler, so the output text is known exactly. The prompt a request renders is checked
against /tokenize of the chat messages it stands for (the chat route's own rendering)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import test_tools_reasoning as scripted

from fp4serve.server.responses_protocol import MessageItem, OutputMessage, OutputText, ResponseObject
from fp4serve.server.responses_store import ResponseStore, StoredResponse

# The scripted server and its fixtures, from test_tools_reasoning (this module gets its own server).
live, say, client, WEATHER_TOOL = scripted.live, scripted.say, scripted.client, scripted.WEATHER_TOOL
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
FLAT_TOOL = {"type": "function", "name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
             "parameters": WEATHER_TOOL["function"]["parameters"]}  # fmt: skip
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def prompt_tokens(live, messages: list[dict], tools: list | None = None, thinking: bool = True) -> int:
    body = {"messages": messages} | ({"tools": tools} if tools else {}) | ({} if thinking else NO_THINKING)
    return httpx.post(f"{live.base}/tokenize", json=body).json()["count"]


def test_text_answer(live, say, client):
    say("It is sunny in Paris.")
    response = client.responses.create(model="scripted", input="Weather in Paris?", instructions="Be brief.",
                                       max_output_tokens=50, extra_body=NO_THINKING, metadata={"k": "v"})  # fmt: skip
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "scripted"
    assert response.status == "completed" and response.incomplete_details is None and response.error is None
    assert response.output_text == "It is sunny in Paris."
    [message] = response.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert message.id.startswith("msg_") and [p.type for p in message.content] == ["output_text"]
    assert response.metadata == {"k": "v"} and response.max_output_tokens == 50
    usage = response.usage
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    assert usage.input_tokens == prompt_tokens(live, messages, thinking=False)
    assert usage.output_tokens == len(live.engine.tokenizer("It is sunny in Paris.").input_ids) + 1  # and EOS
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_reasoning_item(say, client):
    say("The user asks about weather.\n</think>\n\nSunny.")
    response = client.responses.create(model="scripted", input="Weather in Paris?")
    reasoning, _ = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert [c.text for c in reasoning.content] == ["The user asks about weather.\n"]
    assert response.output_text == "\n\nSunny."
    assert response.usage.output_tokens_details.reasoning_tokens > 0

    events = list(client.responses.create(model="scripted", input="Weather in Paris?", stream=True))
    kinds = event_sequence(events)
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    first_text = kinds.index("response.output_text.delta")
    assert kinds[first_text - 6 : first_text] == [
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added", "response.content_part.added"]  # fmt: skip
    reasoning_deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning_deltas == reasoning.content[0].text
    final = events[-1].response
    assert [(o.type, o.status) for o in final.output] == [("reasoning", "completed"), ("message", "completed")]
    assert final.output_text == response.output_text and final.usage == response.usage


def test_cut_off_answer_is_incomplete(say, client):
    say("w1 w2 w3 w4 w5 w6 w7 w8")
    response = client.responses.create(model="scripted", input="Count", max_output_tokens=3, extra_body=NO_THINKING)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 3


def event_sequence(events) -> list[str]:
    return [e.type for e in events]


def test_stream_events_in_order(say, client):
    text = "It is sunny in Paris today."
    say(text)
    events = list(client.responses.create(model="scripted", input="Weather?", stream=True, extra_body=NO_THINKING))
    kinds = event_sequence(events)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * len(deltas) + [
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]  # fmt: skip
    assert len(deltas) > 1 and [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.id == events[0].response.id and final.output_text == text
    assert events[-2].item.id == final.output[0].id == deltas[0].item_id

    # The SDK's stream helper rebuilds the response from the events, and agrees with a whole answer.
    with client.responses.stream(model="scripted", input="Weather?", extra_body=NO_THINKING) as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
        helper = stream.get_final_response()
    assert helper.output_text == snapshots[-1] == text
    whole = client.responses.create(model="scripted", input="Weather?", extra_body=NO_THINKING)
    assert whole.output_text == text and whole.usage == final.usage


def test_stream_has_event_lines(live, say):
    say("Hi there.")
    body = {"model": "scripted", "input": "Hi", "stream": True} | NO_THINKING
    with httpx.stream("POST", f"{live.url}/responses", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = [b for b in response.read().decode().split("\n\n") if b]
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line == f"event: {json.loads(data_line.removeprefix('data: '))['type']}"
    assert "[DONE]" not in blocks[-1]


def test_function_call_round_trip(live, say, client):
    say(f"I should call the tool.\n</think>\n\n{CALL_TEXT}")
    first = client.responses.create(model="scripted", input="Weather in Paris?", tools=[FLAT_TOOL])
    reasoning, call = first.output  # the "\n\n" between </think> and the call is no message
    assert reasoning.type == "reasoning" and call.type == "function_call" and first.output_text == ""
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 2}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"

    events = list(client.responses.create(model="scripted", input="Weather in Paris?", tools=[FLAT_TOOL], stream=True))
    kinds = event_sequence(events)
    at = kinds.index("response.function_call_arguments.delta")
    assert kinds[at - 1 : at + 3] == ["response.output_item.added", "response.function_call_arguments.delta",
                                      "response.function_call_arguments.done", "response.output_item.done"]  # fmt: skip
    assert events[at - 1].item.type == "function_call" and events[at - 1].item.arguments == ""
    assert events[at + 1].arguments == call.arguments and kinds[-1] == "response.completed"

    # The client runs the tool and sends everything back, as an agent loop does.
    say("It is 21 degrees in Paris.")
    items = [{"role": "user", "content": "Weather in Paris?"}] + [o.model_dump(exclude_none=True) for o in first.output]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": "21C"})
    second = client.responses.create(model="scripted", input=items, tools=[FLAT_TOOL], extra_body=NO_THINKING)
    assert second.output_text == "It is 21 degrees in Paris."
    chat_call = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [chat_call],
                 "reasoning_content": "I should call the tool.\n"},
                {"role": "tool", "tool_call_id": call.call_id, "content": "21C"}]  # fmt: skip
    assert second.usage.input_tokens == prompt_tokens(live, messages, [WEATHER_TOOL], thinking=False)


def test_previous_response_id_chain(live, say, client):
    say("Paris.")
    first = client.responses.create(model="scripted", input="Capital of France?", instructions="Be brief.",
                                    extra_body=NO_THINKING)  # fmt: skip
    say("Berlin.")
    second = client.responses.create(model="scripted", input="And of Germany?", previous_response_id=first.id,
                                     instructions="One word.", extra_body=NO_THINKING)  # fmt: skip
    assert second.previous_response_id == first.id and second.output_text == "Berlin."
    # The earlier turn's input and output, then the new input; only the new request's instructions.
    messages = [{"role": "system", "content": "One word."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Germany?"}]  # fmt: skip
    assert second.usage.input_tokens == prompt_tokens(live, messages, thinking=False)
    say("Rome.")
    third = client.responses.create(model="scripted", input=[{"role": "user", "content": "And Italy?"}],
                                    previous_response_id=second.id, extra_body=NO_THINKING)  # fmt: skip
    messages = messages[1:] + [{"role": "assistant", "content": "Berlin."}, {"role": "user", "content": "And Italy?"}]
    assert third.usage.input_tokens == prompt_tokens(live, messages, thinking=False)

    retrieved = client.responses.retrieve(second.id)
    assert retrieved.model_dump() == second.model_dump()
    client.responses.delete(second.id)
    for gone in (lambda: client.responses.retrieve(second.id), lambda: client.responses.delete(second.id)):
        with pytest.raises(openai.NotFoundError) as error:
            gone()
        assert error.value.body["message"] == f"Response with id '{second.id}' not found."
    client.responses.retrieve(third.id)  # its chain holds the deleted turn: it still continues

    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="scripted", input="Hi", previous_response_id="resp_unknown")
    assert error.value.body == {"message": "Previous response with id 'resp_unknown' not found.",
                                "type": "invalid_request_error", "param": "previous_response_id",
                                "code": "previous_response_not_found"}  # fmt: skip
    unstored = client.responses.create(model="scripted", input="Hi", store=False, extra_body=NO_THINKING)
    assert unstored.model_extra["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_store_is_a_bounded_lru():
    def entry(text: str, previous=None) -> StoredResponse:
        output = [OutputMessage(status="completed", content=[OutputText(text=text)])]
        return StoredResponse(
            ResponseObject(model="m", output=output), [MessageItem(role="user", content="q")], previous
        )

    store = ResponseStore(max_entries=2)
    a = entry("a")
    store.put(a)
    b = entry("b", previous=a)
    store.put(b)
    store.get(a.response.id)  # a is now the most recently used: b goes first
    c = entry("c", previous=b)
    store.put(c)
    assert len(store) == 2 and store.get(b.response.id) is None and store.get(a.response.id) is a
    # c's conversation still holds b, dropped from the index: q, a, q, b, q, c
    texts = [item.content if isinstance(item.content, str) else None for item in c.conversation()]
    assert texts == ["q", "a", "q", "b", "q", "c"]
    assert ResponseStore(max_entries=0).put(a) is None and len(ResponseStore(0)) == 0


def test_closed_stream_aborts_the_request(live, say, client, monkeypatch):
    script = " ".join(["w"] * 150)
    say(script)
    aborted = []  # what engine.abort_request returned: an output only for a request still running
    real_abort = live.engine.abort_request
    monkeypatch.setattr(live.engine, "abort_request", lambda rid: aborted.append(real_abort(rid)) or aborted[-1])
    stream = client.responses.create(model="scripted", input="Go on", stream=True, extra_body=NO_THINKING)
    events = iter(stream)
    while next(events).type != "response.output_text.delta":
        pass
    stream.close()
    live.wait_idle()  # the abort freed the request's KV blocks
    (output,) = aborted
    assert output is not None and output.outputs[0].finish_reason == "abort"
    assert len(output.outputs[0].token_ids) < len(live.engine.tokenizer(script).input_ids)  # cut before the end


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "built-in tools (web_search) are not supported"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type", "file_search"),
        ({"background": True}, "background", "background responses are not supported"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]},
         "input[0].content[0]", "images are not supported by this model"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "'item_reference' are not supported"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]},
         "input[0].arguments", "not valid JSON"),
        ({"input": []}, "input", "the input is empty"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "Input should be"),
        ({"temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"tool_choice": "auto"}, "tool_choice", "tool_choice requires tools"),
        ({"truncation": "auto"}, "truncation", 'only truncation "disabled"'),
    ],
)  # fmt: skip
def test_bad_requests_are_named(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**({"model": "scripted", "input": "Hi"} | body))
    assert error.value.body["param"] == param and words in error.value.body["message"], error.value.body


def test_content_parts_and_developer_messages(live, say, client):
    say("Done.")
    items = [{"role": "developer", "content": "Answer in English."},
             {"role": "user", "content": [{"type": "input_text", "text": "Part one."},
                                          {"type": "input_text", "text": "Part two."}]}]  # fmt: skip
    response = client.responses.create(model="scripted", input=items, instructions="Be brief.", extra_body=NO_THINKING)
    messages = [{"role": "system", "content": "Be brief.\n\nAnswer in English."},
                {"role": "user", "content": "Part one.\nPart two."}]  # fmt: skip
    assert response.output_text == "Done."
    assert response.usage.input_tokens == prompt_tokens(live, messages, thinking=False)
