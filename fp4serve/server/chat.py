"""POST /v1/chat/completions: messages -> the model's chat template -> token ids -> the assistant's
reply, whole or streamed. The place where reasoning and tool-call parsers will sit between the
engine's text and the reply's fields."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fp4serve.engine.async_engine import AsyncEngine, RequestStream
from fp4serve.engine.sampler import TokenLogprobs
from fp4serve.errors import InvalidRequestError
from fp4serve.server.protocol import (
    APIError,
    ChatCompletionChoice,
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbsContent,
    ChatResponseMessage,
    DeltaMessage,
    EventStream,
    UsageInfo,
    sse_events,
)
from fp4serve.tokenizer import chat_prompt_ids


async def create_chat_completion(
    engine: AsyncEngine, request: ChatCompletionRequest, model: str
) -> ChatCompletionResponse | EventStream:
    prompt_ids = apply_chat_template(engine.tokenizer, request)
    params = request.to_sampling_params(len(prompt_ids), engine.max_model_len, engine.default_sampling)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = await engine.add_request({"prompt_token_ids": prompt_ids, "prompt": None}, params, request_id)
    if request.stream:
        chunks = _stream_chunks(stream, engine.tokenizer, request, model)
        return EventStream(sse_events(chunks), stream.close)

    output = await stream.final_output()
    completion = output.outputs[0]
    logprobs = None
    if completion.logprobs is not None:
        logprobs = _logprobs(engine.tokenizer, completion.logprobs)
    choice = ChatCompletionChoice(
        message=ChatResponseMessage(content=completion.text),
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )
    usage = UsageInfo.of(len(output.prompt_token_ids), len(completion.token_ids))
    return ChatCompletionResponse(id=request_id, model=model, choices=[choice], usage=usage)


def apply_chat_template(tokenizer, request: ChatCompletionRequest) -> list[int]:
    messages = [_template_message(m.model_dump(exclude_none=True)) for m in request.messages]
    try:
        return chat_prompt_ids(tokenizer, messages, request.add_generation_prompt, request.chat_template_kwargs)
    except InvalidRequestError as e:
        raise APIError(400, str(e), param="messages") from e


def _template_message(message: dict) -> dict:
    """OpenAI allows content as a list of parts; templates expect a string. Only text parts exist here."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text":
                raise APIError(400, f"content parts of type {part.get('type')!r} are not supported", param="messages")
            texts.append(part.get("text", ""))
        message["content"] = "\n".join(texts)
    return message


async def _stream_chunks(
    stream: RequestStream, tokenizer, request: ChatCompletionRequest, model: str
) -> AsyncIterator[ChatCompletionStreamResponse]:
    def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None):
        return ChatCompletionStreamResponse(id=stream.request_id, model=model, choices=choices, usage=usage)

    # OpenAI opens every stream with the role and empty content, before any token exists.
    yield chunk([ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content=""))])
    async for output in stream:
        completion = output.outputs[0]
        if not (output.delta_text or output.delta_logprobs or output.finished):
            continue  # the detokenizer held this step's text back (partial character or stop string)
        choice = ChatCompletionStreamChoice(
            delta=DeltaMessage(content=output.delta_text or None),
            logprobs=_logprobs(tokenizer, output.delta_logprobs) if output.delta_logprobs is not None else None,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        yield chunk([choice])
        if output.finished and request.include_usage:
            yield chunk([], UsageInfo.of(len(output.prompt_token_ids), len(completion.token_ids)))


def _logprobs(tokenizer, entries: list[TokenLogprobs]) -> ChatCompletionLogProbs:
    def logprob(token_id: int, value: float) -> ChatLogProb:
        token = tokenizer.decode([token_id])
        return ChatLogProb(token=token, logprob=value, bytes=list(token.encode()))

    content = []
    for entry in entries:
        chosen = logprob(entry.token_id, entry.logprob)
        top = [logprob(token_id, value) for token_id, value in entry.top]
        content.append(ChatLogProbsContent(**chosen.model_dump(), top_logprobs=top))
    return ChatCompletionLogProbs(content=content)
