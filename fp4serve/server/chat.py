"""POST /v1/chat/completions: messages -> the model's chat template -> token ids -> the assistant's
reply, whole or streamed. Between the engine's text and the reply's fields sit the reasoning parser
(<think> text -> `reasoning_content`) and the tool-call parser (tool-call text -> `tool_calls`); a
stream and a whole reply run the same parsers, so they always agree."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from fp4serve.engine.async_engine import AsyncEngine
from fp4serve.engine.grammar import GrammarCompiler, GrammarLogitsProcessor, xgrammar_available
from fp4serve.errors import InvalidRequestError
from fp4serve.multimodal.image_fetch import MediaPolicy, image_bytes
from fp4serve.multimodal.image_processor import decode_image
from fp4serve.multimodal.inputs import ImageInput
from fp4serve.outputs import RequestOutput
from fp4serve.sample.sampler import TokenLogprobs
from fp4serve.server.choices import Choices, fan_out
from fp4serve.server.logprobs import prompt_logprobs_json
from fp4serve.server.options import ServerOptions
from fp4serve.server.prompt_work import PromptWork, chat_length
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
    DeltaToolCall,
    EventStream,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    UsageInfo,
    sse_events,
)
from fp4serve.server.reasoning import REASONING_PARSERS, prompt_opens_reasoning
from fp4serve.server.tools import (
    TOOL_PARSERS,
    ForcedToolCalls,
    ParsedToolCall,
    ToolCallParser,
    required_tool_calls_schema,
)
from fp4serve.tokenizer import chat_prompt_ids


async def create_chat_completion(
    engine: AsyncEngine,
    request: ChatCompletionRequest,
    model: str,
    options: ServerOptions,
    work: PromptWork,
    grammars: GrammarCompiler | None = None,
) -> ChatCompletionResponse | EventStream:
    make_tool_parser(request, options)  # checks tool_choice before any work; each choice gets its own below
    schema = output_schema(request)
    work.check_length(chat_length(request, exclude_images=True), "messages")
    prompt_ids, images = await work.run(render_chat_prompt, engine, request, options.media_policy())
    # One placeholder per image still, which the engine expands: the length counts the expansion.
    num_prompt_tokens = len(prompt_ids) + sum(engine.images.preprocessor.num_tokens(i.grid) - 1 for i in images)
    params = request.to_sampling_params(num_prompt_tokens, engine.max_model_len, engine.default_sampling)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    grammar = await compile_grammar(grammars, schema) if schema is not None else None
    prompt = {"prompt_token_ids": prompt_ids, "prompt": None}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    requests = fan_out([prompt], [params])
    parsers = []  # per choice: parsers and grammar matchers keep state
    for _, child in requests:
        reasoning = None
        if grammar is not None:  # the whole output is JSON: no room for a <think> block
            child.logits_processors = [GrammarLogitsProcessor(grammar)]
        else:
            reasoning = make_reasoning_parser(engine.tokenizer, request, options, prompt_ids)
        parsers.append(ReplyParser(reasoning, make_tool_parser(request, options)))
    choices = await Choices.start(engine, requests, request_id)
    if request.stream:
        chunks = _stream_chunks(choices, request_id, engine.tokenizer, request, model, parsers)
        return EventStream(sse_events(chunks), choices.close)

    finals = await choices.final_outputs()
    answer = [_choice(engine.tokenizer, i, output, parser) for i, (output, parser) in enumerate(zip(finals, parsers))]
    # the engine's prompt: image placeholders expanded
    usage = UsageInfo.of(len(finals[0].prompt_token_ids), sum(len(output.outputs[0].token_ids) for output in finals))
    prompt_logprobs = None
    if request.prompt_logprobs is not None and finals[0].prompt_logprobs is not None:
        prompt_logprobs = prompt_logprobs_json(engine.tokenizer, finals[0].prompt_token_ids, finals[0].prompt_logprobs)
    return ChatCompletionResponse(
        id=request_id, model=model, choices=answer, usage=usage, prompt_logprobs=prompt_logprobs
    )


def _choice(tokenizer, index: int, output: RequestOutput, parser: ReplyParser) -> ChatCompletionChoice:
    """One choice of a whole answer: its text through the reasoning and tool-call parsers."""
    completion = output.outputs[0]
    reasoning, content, calls = parser.feed(completion.text)
    more_reasoning, more_content, more_calls = parser.finish()
    reasoning, content, calls = reasoning + more_reasoning, content + more_content, calls + more_calls
    logprobs = None
    if completion.logprobs is not None:
        logprobs = _logprobs(tokenizer, completion.logprobs)
    message = ChatResponseMessage(
        content=content if content or not calls else None,
        reasoning_content=reasoning or None,
        tool_calls=[ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls],
    )
    return ChatCompletionChoice(
        index=index,
        message=message,
        logprobs=logprobs,
        finish_reason=_finish_reason(completion.finish_reason, bool(calls)),
        stop_reason=completion.stop_reason,
    )


# ---- what the request asks for --------------------------------------------------------------
def make_tool_parser(request: ChatCompletionRequest, options: ServerOptions) -> ToolCallParser | ForcedToolCalls | None:
    """The parser for this request's tool calls, or None when its output is plain content (vLLM's rules)."""
    choice = request.effective_tool_choice
    if request.tool_choice not in (None, "none") and not request.tools:
        raise APIError(400, "tool_choice requires tools to be set", param="tool_choice")
    if choice == "none":
        return None
    if choice == "required":
        return ForcedToolCalls(None)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {t.function.name for t in request.tools}:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice")
        return ForcedToolCalls(choice.function.name)
    if not (options.enable_auto_tool_choice and options.tool_call_parser):
        raise APIError(
            400,
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
            param="tool_choice",
        )
    return TOOL_PARSERS[options.tool_call_parser]([t.model_dump() for t in request.tools])


def output_schema(request: ChatCompletionRequest) -> dict | None:
    """The JSON schema the output is held to (constrained decoding), or None for free text."""
    choice = request.effective_tool_choice
    fmt = request.response_format
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and fmt is not None and fmt.type != "text":
        raise APIError(400, "response_format cannot be combined with a forced tool_choice", param="response_format")
    if choice == "required":
        return required_tool_calls_schema([t.model_dump() for t in request.tools])
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in request.tools if t.function.name == choice.function.name)  # checked in _tool_parser
        return tool.function.parameters or {"type": "object"}
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON schema object",
                       param="response_format")  # fmt: skip
    return schema


async def compile_grammar(grammars: GrammarCompiler | None, schema: dict):
    if grammars is None or not xgrammar_available():
        raise APIError(
            400,
            "constrained decoding (response_format json_object/json_schema, tool_choice required or named) "
            "needs the xgrammar package on the server: pip install xgrammar",
            param="response_format",
            code="unsupported_parameter",
        )
    # Compiling indexes the vocabulary the first time (seconds for a large one): not on the event loop.
    return await asyncio.to_thread(grammars.json_schema, schema)


def make_reasoning_parser(tokenizer, request: ChatCompletionRequest, options: ServerOptions, prompt_ids: list[int]):
    if options.reasoning_parser is None or (request.chat_template_kwargs or {}).get("enable_thinking") is False:
        return None
    # The last few prompt tokens tell whether the template opened a think block for the model.
    tail = tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)
    return REASONING_PARSERS[options.reasoning_parser](prompt_opens_reasoning(tail))


class ReplyParser:
    """Output text -> (reasoning, content, tool calls): reasoning first, tool calls in the content."""

    def __init__(self, reasoning, tools: ToolCallParser | ForcedToolCalls | None):
        self.reasoning = reasoning
        self.tools = tools

    def feed(self, text: str) -> tuple[str, str, list[ParsedToolCall]]:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        if self.tools is None:
            return reasoning, content, []
        content, calls = self.tools.feed(content)
        return reasoning, content, calls

    def finish(self) -> tuple[str, str, list[ParsedToolCall]]:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        if self.tools is None:
            return reasoning, content, []
        content, calls = self.tools.feed(content)
        tail, more = self.tools.finish()
        return reasoning, content + tail, calls + more


def _finish_reason(reason: str | None, called_tools: bool) -> str | None:
    return "tool_calls" if called_tools and reason == "stop" else reason


# ---- the prompt -----------------------------------------------------------------------------
def render_chat_prompt(
    engine: AsyncEngine, request: ChatCompletionRequest, policy: MediaPolicy
) -> tuple[list[int], list[ImageInput]]:
    """The templated prompt ids and the request's images, fetched, decoded and preprocessed (on a
    worker thread: fetching and resizing take milliseconds to seconds)."""
    image_urls: list[tuple[str, object]] = []
    prompt_ids = apply_chat_template(engine.tokenizer, request, image_urls)
    if not image_urls:
        return prompt_ids, []
    support = engine.images
    refused = support.refusal(len(image_urls))
    if refused is not None:  # before any image is fetched
        message, first = refused
        raise APIError(400, message, param=image_urls[first][0])
    images = []
    for param, url in image_urls:
        try:
            images.append(support.preprocessor(decode_image(image_bytes(url, policy, param), param)))
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param or param) from e
    return prompt_ids, images


def apply_chat_template(tokenizer, request: ChatCompletionRequest, image_urls: list | None = None) -> list[int]:
    """image_urls: where the request's image parts go, as (param, url); None: images are refused."""
    messages = [
        _template_message(m.model_dump(exclude_none=True), f"messages[{i}]", image_urls)
        for i, m in enumerate(request.messages)
    ]
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
    try:
        return chat_prompt_ids(tokenizer, messages, request.add_generation_prompt, request.chat_template_kwargs, tools)
    except InvalidRequestError as e:
        raise APIError(400, str(e), param="messages") from e
    except (TypeError, ValueError) as e:  # e.g. no messages, or chat_template_kwargs the tokenizer refuses
        raise APIError(400, f"the chat template cannot render this request: {e}", param="messages") from e


_NOT_TEXT = {"input_audio": "audio", "audio_url": "audio", "video_url": "video", "video": "video",
             "file": "files"}  # fmt: skip
_OTHER_IMAGE_PARTS = ("input_image", "image", "image_pil", "image_embeds")


def _template_message(message: dict, where: str, image_urls: list | None) -> dict:
    """OpenAI allows content as a list of parts; templates expect a string, or, for a message with
    images, a list of {"type": "text", "text"} and {"type": "image"} parts (Qwen's templates write
    each image's placeholder tokens where its part is). Each image_url part's (param, url) goes to
    `image_urls`; None refuses them. Tool-call arguments arrive as JSON strings; templates iterate
    them as mappings. `where` is the message's place in the request ("messages[2]"), for the
    error's param. The protocol models have checked the shapes: content parts have a string
    type, tool calls a function. An assistant turn that only called tools has null content (the
    openai SDK sends it so); templates concatenate content as a string, so it becomes "" (as in vLLM)."""
    content = message.get("content")
    if message["role"] == "assistant" and content is None:
        if not message.get("tool_calls"):
            raise APIError(400, "an assistant message needs content or tool_calls", param=f"{where}.content")
        message["content"] = ""
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            kind, param = part["type"], f"{where}.content[{i}]"
            if kind in _NOT_TEXT:
                raise APIError(400, f"{_NOT_TEXT[kind]} input is not supported: send text and image_url parts",
                               param=param)  # fmt: skip
            if kind in _OTHER_IMAGE_PARTS:
                raise APIError(400, f"send images as image_url parts, not {kind!r}", param=param)
            if kind == "image_url":
                if image_urls is None:
                    raise APIError(400, "images are not supported here: send text only", param=param)
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise APIError(400, "an image_url part needs image_url.url, a string", param=f"{param}.image_url")
                image_urls.append((param, url))
                parts.append({"type": "image"})
                continue
            if kind != "text":
                raise APIError(400, f"content parts of type {kind!r} are not supported", param=param)
            if not isinstance(part.get("text"), str):
                raise APIError(400, "a text content part needs a string `text`", param=f"{param}.text")
            parts.append({"type": "text", "text": part["text"]})
        if any(p["type"] == "image" for p in parts):
            message["content"] = parts
        else:
            message["content"] = "\n".join(p["text"] for p in parts)
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        if isinstance(function["arguments"], str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError as e:
                param = f"{where}.tool_calls[{i}].function.arguments"
                raise APIError(400, f"tool call arguments are not valid JSON: {e}", param=param) from e
    return message


# ---- streaming ------------------------------------------------------------------------------
async def _stream_chunks(
    choices: Choices, request_id: str, tokenizer, request: ChatCompletionRequest, model: str, parsers: list[ReplyParser]
) -> AsyncIterator[ChatCompletionStreamResponse]:
    def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None):
        return ChatCompletionStreamResponse(id=request_id, model=model, choices=choices, usage=usage)

    # OpenAI opens every choice's stream with the role and empty content, before any token exists.
    for index in range(len(parsers)):
        yield chunk([ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
    num_calls = [0] * len(parsers)
    generated = [0] * len(parsers)
    prompt_tokens = 0
    async for index, output in choices.outputs():
        completion, parser = output.outputs[0], parsers[index]
        prompt_tokens, generated[index] = len(output.prompt_token_ids), len(completion.token_ids)
        reasoning, content, calls = parser.feed(output.delta_text)
        if output.finished:
            more_reasoning, more_content, more_calls = parser.finish()
            reasoning, content, calls = reasoning + more_reasoning, content + more_content, calls + more_calls
        if not (reasoning or content or calls or output.delta_logprobs or output.finished):
            continue  # text held back (partial character, stop string or tag)
        first_call = num_calls[index]
        tool_calls = [
            DeltaToolCall(index=first_call + i, id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for i, c in enumerate(calls)
        ]
        num_calls[index] += len(calls)
        delta = DeltaMessage(content=content or None, reasoning_content=reasoning or None, tool_calls=tool_calls or None)
        choice = ChatCompletionStreamChoice(
            index=index,
            delta=delta,
            logprobs=_logprobs(tokenizer, output.delta_logprobs) if output.delta_logprobs is not None else None,
            finish_reason=_finish_reason(completion.finish_reason, num_calls[index] > 0),
            stop_reason=completion.stop_reason,
        )
        yield chunk([choice])
    if request.include_usage:  # once, after every choice finished: the prompt once, all choices' tokens
        yield chunk([], UsageInfo.of(prompt_tokens, sum(generated)))


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
