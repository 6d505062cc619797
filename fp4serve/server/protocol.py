"""The OpenAI wire format the server speaks: request and response models, errors, SSE framing.

Request models take the subset of OpenAI's fields that fp4serve implements, plus vLLM's sampling
extensions (top_k, min_p, repetition_penalty, stop_token_ids, ...). Fields outside the schema are
ignored, as vLLM and OpenAI do. Request fields are strict: JSON's true is not the integer 1, "2" is
not a number, and NaN or Infinity (which Python's JSON parser accepts) is no float. Ranges are not
checked here: SamplingParams is the one place that knows them, and its InvalidRequestError becomes a
400 naming the field like any other.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from fp4serve.errors import InvalidRequestError
from fp4serve.sampling_params import FLOAT_RANGES, SamplingParams

log = logging.getLogger(__name__)


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIModel):
    """What a client sends: no type coercion, finite floats only."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# ---- errors -------------------------------------------------------------------------------------
class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class APIError(Exception):
    """An error answered with `status` and OpenAI's error JSON."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_response(error: Exception) -> tuple[int, ErrorResponse]:
    """The HTTP status and body for any exception: our own 4xx, or a 500 that tells the client
    only an id to quote; the failure itself goes to the log under that id."""
    if isinstance(error, APIError):
        status, message, param, code = error.status, error.message, error.param, error.code
    elif isinstance(error, InvalidRequestError):
        status, message, param, code = 400, str(error), error.param, None
    else:
        error_id = uuid.uuid4().hex[:16]
        log.error("internal error %s: %s: %s", error_id, type(error).__name__, error, exc_info=error)
        status, message, param, code = 500, f"internal error (request id {error_id})", None, None
    # OpenAI's own types: the caller's fault, or ours.
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return status, ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


def error_json(error: Exception, headers: dict | None = None):
    """The JSONResponse for any exception; an APIError's own headers (e.g. Retry-After) included."""
    from fastapi.responses import JSONResponse

    status, body = error_response(error)
    headers = {**(getattr(error, "headers", None) or {}), **(headers or {})}
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers or None)


# ---- server-sent events -------------------------------------------------------------------------
SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


@dataclass
class EventStream:
    """A streamed answer: SSE text events, and `close`, which the HTTP layer calls when the response
    ends however it ends (finished, client gone, error), so the engine request never outlives it."""

    events: AsyncIterator[str]
    close: Callable[[], None]


async def sse_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Frame `chunks` as SSE events ending with [DONE]. The status line is long sent when an error
    happens mid-stream, so the error travels as an event (the openai client raises it)."""
    try:
        async for chunk in chunks:
            yield sse_event(chunk)
    except Exception as e:  # error_response logs a server-side failure
        yield sse_event(error_response(e)[1])
    yield SSE_DONE


# ---- shared pieces ------------------------------------------------------------------------------
class UsageInfo(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class StreamOptions(RequestModel):
    include_usage: bool = False


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fp4serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# OpenAI and vLLM request fields that fp4serve does not implement. Sent with a value that asks for
# something (anything but null, false, 0 or empty), they get a 400 naming the field, instead of
# being ignored like truly unknown fields: a client relying on them must not get a silent wrong answer.
UNSUPPORTED_FIELDS = {
    "logit_bias": "logit_bias is not supported",
    # Ranking best_of candidates by cumulative logprob is not implemented; vLLM V1 refuses it too.
    "best_of": "best_of is not supported (use n, which returns every choice)",
    "suffix": "suffix (insertion) is not supported",
    "functions": "functions/function_call are deprecated by OpenAI and not supported; use tools",
    "function_call": "functions/function_call are deprecated by OpenAI and not supported; use tools",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "guided_json": "constrained decoding (guided_*) is not supported yet",
    "guided_regex": "constrained decoding (guided_*) is not supported yet",
    "guided_choice": "constrained decoding (guided_*) is not supported yet",
    "guided_grammar": "constrained decoding (guided_*) is not supported yet",
    "structured_outputs": "constrained decoding (structured_outputs) is not supported yet",
}


def sampling_range(name: str):
    """A float field with SamplingParams' range for it, so the OpenAPI schema states what is enforced."""
    low, high, low_open = FLOAT_RANGES[name]
    return Field(None, gt=low, le=high) if low_open else Field(None, ge=low, le=high)


TokenId = Annotated[int, Field(ge=0)]  # and below the vocabulary size, which the engine checks


class SamplingRequest(RequestModel):
    """Fields common to /v1/completions and /v1/chat/completions. A sampling field left out (None)
    takes the model's generation_config default, then SamplingParams' own."""

    unsupported_fields: ClassVar[dict[str, str]] = UNSUPPORTED_FIELDS

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data):
        if isinstance(data, dict):
            for name, reason in cls.unsupported_fields.items():
                if data.get(name) not in (None, False, 0, "", [], {}):
                    raise APIError(400, f"{reason} by fp4serve", param=name, code="unsupported_parameter")
            if data.get("modalities") not in (None, ["text"]):
                raise APIError(400, "only text output is supported", param="modalities", code="unsupported_parameter")
        return data

    model: str | None = None  # None: the first served model name
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = sampling_range("temperature")
    top_p: float | None = sampling_range("top_p")
    top_k: int | None = None
    min_p: float | None = sampling_range("min_p")
    presence_penalty: float | None = sampling_range("presence_penalty")
    frequency_penalty: float | None = sampling_range("frequency_penalty")
    repetition_penalty: float | None = sampling_range("repetition_penalty")
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt_logprobs: int | None = None  # vLLM's extension; 0..20 (SamplingParams checks the range)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """How many alternatives to return with each token; None: no logprobs."""
        return None

    def requested_prompt_logprobs(self) -> int | None:
        """vLLM's rule: prompt logprobs come only with the whole answer (0 asks for nothing to return)."""
        if self.stream and self.prompt_logprobs:
            raise APIError(400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        return None if self.stream else self.prompt_logprobs

    def to_sampling_params(self, prompt_len: int, max_model_len: int, defaults: dict) -> SamplingParams:
        max_tokens = self.requested_max_tokens()
        check_context_length(prompt_len, max_tokens, max_model_len)
        return SamplingParams.from_defaults(
            defaults,
            n=self.n,
            # Like vLLM, a request without max_tokens may fill the context.
            max_tokens=max_model_len - prompt_len if max_tokens is None else max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=self.requested_logprobs(),
            prompt_logprobs=self.requested_prompt_logprobs(),
        )


def check_context_length(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    """vLLM's checks and wording, which clients and benchmark tools match on."""
    if max_tokens is None and prompt_len >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len} tokens in the messages, Please reduce the length of the messages.",
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
            f"Please reduce the length of the messages or completion.",
            code="context_length_exceeded",
        )


# ---- /v1/completions ----------------------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: int | None = None
    echo: bool = False

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts, one or a list of them (strings or token-id lists), in order."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str | list):
            return list(self.prompt)
        return [self.prompt]

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_list())

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_max_tokens(self) -> int | None:
        # echo with max_tokens 0 returns the prompt alone: the engine still samples one token
        # (every request does), which the answer leaves out (vLLM's way).
        return 1 if self.echo and self.max_tokens == 0 else self.max_tokens

    def requested_prompt_logprobs(self) -> int | None:
        # echo with logprobs puts the prompt tokens' logprobs first: they are computed too (vLLM's rule).
        prompt_logprobs = super().requested_prompt_logprobs()
        if prompt_logprobs is None and self.echo:
            return self.logprobs
        return prompt_logprobs


class PromptLogprob(OpenAIModel):
    """vLLM's Logprob, as its prompt_logprobs carry it."""

    logprob: float
    rank: int
    decoded_token: str


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's extension: the stop string or token id that ended it
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None  # vLLM's, with prompt_logprobs


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # in a stream: only the last chunk's, with include_usage


# ---- /v1/chat/completions -----------------------------------------------------------------------
class ContentPart(RequestModel):
    """One part of a message's content list; chat.py decides which types it takes."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    type: str


class MessageFunctionCall(RequestModel):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string; chat.py hands templates a mapping


class MessageToolCall(RequestModel):
    """A tool call in an assistant message of the conversation (OpenAI's shape)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(RequestModel):
    """A message as the chat template sees it; fields beyond these (reasoning_content, ...) are
    kept and handed to the template. The typed ones are those templates iterate or print."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(RequestModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments


class ToolDefinition(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingRequest):
    # vLLM's chat `echo` repeats the last message; fp4serve does not implement it.
    unsupported_fields: ClassVar[dict[str, str]] = UNSUPPORTED_FIELDS | {
        "echo": "echo is not supported for chat completions"
    }
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # accepted; the model decides how many calls it writes
    response_format: ResponseFormat | None = None

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def requested_max_tokens(self) -> int | None:
        # max_tokens is OpenAI's deprecated name for max_completion_tokens.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatLogProb(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIModel):
    content: list[ChatLogProbsContent] | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON object as a string


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCall):
    index: int


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # vLLM's field for the text of a <think> block
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(OpenAIModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None  # vLLM's: one prompt, so once per response


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _only_what_changed(self, handler):
        # A delta names only the fields this chunk adds; OpenAI streams leave the rest out.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(OpenAIModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
