"""POST /v1/completions: one prompt (text or token ids) in, its continuation out, whole or streamed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fp4serve.engine.async_engine import AsyncEngine, RequestStream
from fp4serve.sample.sampler import TokenLogprobs
from fp4serve.server.prompt_work import PromptWork
from fp4serve.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    EventStream,
    UsageInfo,
    sse_events,
)


async def create_completion(
    engine: AsyncEngine, request: CompletionRequest, model: str, work: PromptWork
) -> CompletionResponse | EventStream:
    text, prompt_ids = await _tokenize_prompt(engine.tokenizer, request.prompt, work)
    params = request.to_sampling_params(len(prompt_ids), engine.max_model_len, engine.default_sampling)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    stream = await engine.add_request({"prompt_token_ids": prompt_ids, "prompt": text}, params, request_id)
    if request.stream:
        chunks = _stream_chunks(stream, engine.tokenizer, request, model)
        return EventStream(sse_events(chunks), stream.close)

    output = await stream.final_output()
    completion = output.outputs[0]
    logprobs = None
    if completion.logprobs is not None:
        logprobs = _logprobs(engine.tokenizer, completion.logprobs, text_offset=0)
    choice = CompletionChoice(
        text=completion.text,
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )
    usage = UsageInfo.of(len(output.prompt_token_ids), len(completion.token_ids))
    return CompletionResponse(id=request_id, model=model, choices=[choice], usage=usage)


async def _tokenize_prompt(tokenizer, prompt, work: PromptWork) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of the one prompt a request may carry."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"got {len(prompt)} prompts; send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        work.check_length(len(prompt), "prompt")
        # Plain text gets the tokenizer's special tokens (BOS), as in vLLM.
        return prompt, await work.run(lambda: tokenizer(prompt).input_ids)
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    return None, prompt


async def _stream_chunks(
    stream: RequestStream, tokenizer, request: CompletionRequest, model: str
) -> AsyncIterator[CompletionResponse]:
    text_offset = 0
    async for output in stream:
        completion = output.outputs[0]
        if not (output.delta_text or output.delta_logprobs or output.finished):
            continue  # the detokenizer held this step's text back (partial character or stop string)
        logprobs = None
        if output.delta_logprobs is not None:
            logprobs = _logprobs(tokenizer, output.delta_logprobs, text_offset)
            text_offset += sum(len(token) for token in logprobs.tokens)
        choice = CompletionChoice(
            text=output.delta_text,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        yield CompletionResponse(id=output.request_id, model=model, choices=[choice])
        if output.finished and request.include_usage:
            usage = UsageInfo.of(len(output.prompt_token_ids), len(completion.token_ids))
            yield CompletionResponse(id=output.request_id, model=model, choices=[], usage=usage)


def _logprobs(tokenizer, entries: list[TokenLogprobs], text_offset: int) -> CompletionLogProbs:
    """The legacy completions format: per token its text, logprob, offset and a {text: logprob} map
    of the alternatives, which always includes the sampled token (as OpenAI documents)."""
    result = CompletionLogProbs()
    for entry in entries:
        token = tokenizer.decode([entry.token_id])
        top = {tokenizer.decode([token_id]): logprob for token_id, logprob in entry.top}
        top[token] = entry.logprob
        result.tokens.append(token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result
