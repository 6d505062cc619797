"""POST /v1/responses (OpenAI's Responses API), and GET / DELETE /v1/responses/{id}.

A request becomes the chat request it amounts to (responses_input.py: items -> messages), so the
chat route's machinery serves it unchanged: the chat template, the tool-call and reasoning parsers,
constrained decoding for text.format, sampling parameters, the length checks. The parsed reply
becomes output items (responses_output.py), whole or as OpenAI's stream of events. A finished
response is stored (unless "store": false) for previous_response_id (responses_store.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fp4serve.engine.async_engine import AsyncEngine, RequestStream
from fp4serve.engine.grammar import GrammarCompiler, GrammarLogitsProcessor
from fp4serve.server.chat import (
    ReplyParser,
    apply_chat_template,
    compile_grammar,
    make_reasoning_parser,
    make_tool_parser,
    output_schema,
)
from fp4serve.server.options import ServerOptions
from fp4serve.server.prompt_work import PromptWork, chat_length
from fp4serve.server.protocol import APIError, ChatCompletionRequest, EventStream, error_response
from fp4serve.server.responses_input import chat_messages
from fp4serve.server.responses_output import OutputBuilder
from fp4serve.server.responses_protocol import (
    IncompleteDetails,
    MessageItem,
    OutputTokensDetails,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from fp4serve.server.responses_store import ResponseStore, StoredResponse


async def create_response(
    engine: AsyncEngine,
    request: ResponsesRequest,
    model: str,
    options: ServerOptions,
    work: PromptWork,
    grammars: GrammarCompiler,
    store: ResponseStore,
) -> ResponseObject | EventStream:
    previous = None
    if request.previous_response_id is not None:
        previous = store.get(request.previous_response_id)
        if previous is None:
            raise APIError(404, f"Previous response with id '{request.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")  # fmt: skip
    new_items = [MessageItem(role="user", content=request.input)] if isinstance(request.input, str) else request.input
    chat = _as_chat_request(request, previous, new_items)
    tool_parser = make_tool_parser(chat, options)
    schema = output_schema(chat)
    work.check_length(chat_length(chat), "input")
    prompt_ids = await work.run(apply_chat_template, engine.tokenizer, chat)
    params = chat.to_sampling_params(len(prompt_ids), engine.max_model_len, engine.default_sampling)
    reasoning = None
    if schema is not None:  # the whole output is JSON: no room for a <think> block
        params.logits_processors = [GrammarLogitsProcessor(await compile_grammar(grammars, schema))]
    else:
        reasoning = make_reasoning_parser(engine.tokenizer, chat, options, prompt_ids)
    response = ResponseObject(
        model=model,
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        metadata=request.metadata or {},
        parallel_tool_calls=request.parallel_tool_calls,
        previous_response_id=request.previous_response_id,
        store=request.store,
        temperature=params.temperature,
        top_p=params.top_p,
        text={"format": request.text.format.model_dump(by_alias=True, exclude_none=True)}
        if request.text and request.text.format
        else {"format": {"type": "text"}},
        tool_choice=_echo(request.tool_choice) if request.tool_choice is not None else chat.effective_tool_choice,
        tools=[t.model_dump(exclude_none=True) for t in request.tools or []],
        user=request.user,
    )
    turn = _Turn(engine, work, response, ReplyParser(reasoning, tool_parser))
    stream = await engine.add_request({"prompt_token_ids": prompt_ids, "prompt": None}, params, response.id)

    def remember() -> None:
        if request.store:
            store.put(StoredResponse(response, new_items, previous))

    if request.stream:
        return EventStream(_sse(turn.events(stream, remember)), stream.close)
    try:
        async for _ in turn.run(stream):
            pass
    finally:
        stream.close()
    remember()
    return response


def _as_chat_request(request: ResponsesRequest, previous: StoredResponse | None, new_items: list):
    earlier = [(item, None) for item in previous.conversation()] if previous else []
    items = earlier + [(item, f"input[{i}]") for i, item in enumerate(new_items)]
    messages = chat_messages(request.instructions, items)
    if not messages:
        raise APIError(400, "the input is empty: send a message", param="input")
    chat = {
        "messages": messages,
        "max_completion_tokens": request.max_output_tokens,
        "chat_template_kwargs": request.chat_template_kwargs,
        "parallel_tool_calls": request.parallel_tool_calls,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop"):  # fmt: skip
        chat[name] = getattr(request, name)
    if request.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type", "strict"}, exclude_none=True)}
                         for t in request.tools]  # fmt: skip
    if request.tool_choice is not None:
        choice = request.tool_choice
        chat["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = request.text.format if request.text else None
    if fmt is not None:
        chat["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            chat["response_format"]["json_schema"] = {"name": fmt.name or "output", "schema": fmt.schema_}
    # Every value was checked by ResponsesRequest with the chat request's own types and ranges.
    return ChatCompletionRequest.model_validate(chat)


def _echo(choice) -> str | dict:
    return choice if isinstance(choice, str) else choice.model_dump()


class _Turn:
    """One response being generated: the engine's deltas -> parsed reply -> output items and events."""

    def __init__(self, engine: AsyncEngine, work: PromptWork, response: ResponseObject, parser: ReplyParser):
        self.engine, self.work, self.response, self.parser = engine, work, response, parser
        self.builder = OutputBuilder()
        response.output = self.builder.items

    async def run(self, stream: RequestStream) -> AsyncIterator[dict]:
        """The item events as the engine generates; at the end the response is complete."""
        async for output in stream:
            completion = output.outputs[0]
            events = self.builder.add(*self.parser.feed(output.delta_text))
            if output.finished:
                events += self.builder.add(*self.parser.finish())
                incomplete = completion.finish_reason == "length"
                events += self.builder.finish("incomplete" if incomplete else "completed")
                await self._complete(incomplete, len(output.prompt_token_ids), len(completion.token_ids))
            for event in events:
                yield event

    async def events(self, stream: RequestStream, on_complete) -> AsyncIterator[dict]:
        """The whole stream: created, in_progress, the items' events, then completed or incomplete."""
        yield {"type": "response.created", "response": self._snapshot()}
        yield {"type": "response.in_progress", "response": self._snapshot()}
        async for event in self.run(stream):
            yield event
        on_complete()
        yield {"type": f"response.{self.response.status}", "response": self.response.model_dump(mode="json")}

    def _snapshot(self) -> dict:
        return self.response.model_dump(mode="json")

    async def _complete(self, incomplete: bool, input_tokens: int, output_tokens: int) -> None:
        response = self.response
        response.status = "incomplete" if incomplete else "completed"
        response.incomplete_details = IncompleteDetails(reason="max_output_tokens") if incomplete else None
        response.completed_at = int(time.time())
        reasoning_tokens = 0
        if self.builder.reasoning_text:  # the reasoning text tokenized again: the parser works on text
            tokenizer = self.engine.tokenizer
            ids = await self.work.run(
                lambda: tokenizer(self.builder.reasoning_text, add_special_tokens=False).input_ids
            )
            reasoning_tokens = min(len(ids), output_tokens)
        response.usage = ResponseUsage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
            total_tokens=input_tokens + output_tokens,
        )


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Frame events as OpenAI does: an `event:` line with the type, a sequence number from 0, and
    no [DONE]. An error after the status line went out travels as an "error" event."""
    sequence = 0
    try:
        async for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': sequence})}\n\n"
            sequence += 1
    except Exception as e:  # error_response logs a server-side failure
        error = error_response(e)[1].error
        event = {"type": "error", "code": error.code, "message": error.message, "param": error.param,
                 "sequence_number": sequence}  # fmt: skip
        yield f"event: error\ndata: {json.dumps(event)}\n\n"


def stored_response(store: ResponseStore, response_id: str) -> ResponseObject:
    entry = store.get(response_id)
    if entry is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
    return entry.response
