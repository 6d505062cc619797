"""POST /v1/completions: one prompt or a list of them (text or token ids) in, n continuations of
each out (choices.py), whole or streamed; `echo` puts the prompt (and its logprobs) first."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fp4serve.outputs import RequestOutput
from fp4serve.server.choices import Choices, fan_out
from fp4serve.server.logprobs import legacy_logprobs, prompt_logprobs_json
from fp4serve.server.prompt_work import PromptWork
from fp4serve.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EventStream,
    UsageInfo,
    sse_events,
)


async def create_completion(
    engine, request: CompletionRequest, model: str, work: PromptWork
) -> CompletionResponse | EventStream:
    prompts = await _tokenize_prompts(engine.tokenizer, request, work)
    params = [request.to_sampling_params(len(ids), engine.max_model_len, engine.default_sampling) for _, ids in prompts]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    inputs = [{"prompt_token_ids": ids, "prompt": text} for text, ids in prompts]
    choices = await Choices.start(engine, fan_out(inputs, params), request_id)
    answer = _Answer(engine.tokenizer, request, prompts)
    if request.stream:
        chunks = _stream_chunks(choices, answer, request, model, request_id)
        return EventStream(sse_events(chunks), choices.close)

    finals = await choices.final_outputs()
    result = [
        answer.choice(i, output, output.outputs[0].text, output.outputs[0].logprobs, 0)
        for i, output in enumerate(finals)
    ]
    usage = answer.usage([len(output.outputs[0].token_ids) for output in finals])
    return CompletionResponse(id=request_id, model=model, choices=result, usage=usage)


async def _tokenize_prompts(
    tokenizer, request: CompletionRequest, work: PromptWork
) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) of each prompt, in order. Token-id prompts get their text only for echo."""
    prompts = request.prompt_list()
    result = []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            work.check_length(len(prompt), param)
            # Plain text gets the tokenizer's special tokens (BOS), as in vLLM.
            result.append((prompt, await work.run(lambda p=prompt: tokenizer(p).input_ids)))
        elif not prompt:
            raise APIError(400, "the prompt is empty", param=param)
        else:
            text = await work.run(lambda p=prompt: tokenizer.decode(p)) if request.echo else None
            result.append((text, prompt))
    return result


class _Answer:
    """Engine outputs -> choices: choice i belongs to prompt i // n; echo puts the prompt first."""

    def __init__(self, tokenizer, request: CompletionRequest, prompts: list[tuple[str | None, list[int]]]):
        self.tokenizer = tokenizer
        self.request = request
        self.prompts = prompts
        self.echo_only = request.echo and request.max_tokens == 0  # the one sampled token is left out

    def choice(self, index: int, output: RequestOutput, text: str, logprobs, text_offset: int,
               first: bool = True) -> CompletionChoice:  # fmt: skip
        """Choice `index` with this text and these sampled-token logprobs; `first`: the chunk
        (or whole answer) that carries the echoed prompt."""
        request, completion = self.request, output.outputs[0]
        prompt_text, prompt_ids = self.prompts[index // request.n]
        pairs = [(entry.token_id, entry) for entry in logprobs or []]
        if self.echo_only:
            text, pairs = "", []
        if request.echo and first:
            text = (prompt_text or "") + text
            pairs = list(zip(prompt_ids, output.prompt_logprobs or [None] * len(prompt_ids))) + pairs
        legacy = legacy_logprobs(self.tokenizer, pairs, text_offset) if request.logprobs is not None else None
        prompt_logprobs = None
        if request.prompt_logprobs is not None and output.prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs_json(self.tokenizer, prompt_ids, output.prompt_logprobs)
        return CompletionChoice(index=index, text=text, logprobs=legacy, finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason, prompt_logprobs=prompt_logprobs)  # fmt: skip

    def usage(self, completion_tokens: list[int]) -> UsageInfo:
        """Prompt tokens once per prompt, completion tokens of every choice (vLLM's sums)."""
        generated = 0 if self.echo_only else sum(completion_tokens)
        return UsageInfo.of(sum(len(ids) for _, ids in self.prompts), generated)


async def _stream_chunks(
    choices: Choices, answer: _Answer, request: CompletionRequest, model: str, request_id: str
) -> AsyncIterator[CompletionResponse]:
    num_choices = len(choices.streams)
    text_offset = [0] * num_choices
    echoed = [False] * num_choices
    generated = [0] * num_choices
    async for index, output in choices.outputs():
        first = request.echo and not echoed[index]  # the echoed prompt comes first, whatever this step held back
        if not (first or output.delta_text or output.delta_logprobs or output.finished):
            continue  # the detokenizer held this step's text back (partial character or stop string)
        choice = answer.choice(index, output, output.delta_text, output.delta_logprobs, text_offset[index], first)
        echoed[index] = True
        generated[index] = len(output.outputs[0].token_ids)
        if choice.logprobs is not None:
            text_offset[index] += sum(len(token) for token in choice.logprobs.tokens)
        yield CompletionResponse(id=request_id, model=model, choices=[choice])
    if request.include_usage:
        yield CompletionResponse(id=request_id, model=model, choices=[], usage=answer.usage(generated))
