"""The wire format of OpenAI's Responses API (/v1/responses): the request with its input items, the
response object and its output items. Shapes follow the openai SDK's own types
(openai/types/responses/), so the SDK parses every field. Request models are strict like the chat
ones (protocol.RequestModel); sampling ranges are SamplingParams'."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from fp4serve.server.protocol import APIError, ContentPart, OpenAIModel, RequestModel, sampling_range

# ---- the request --------------------------------------------------------------------------------


class MessageItem(RequestModel):
    """A message of the conversation; `type` may be left out (OpenAI's "easy" input message)."""

    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(RequestModel):
    """A tool call the model made in an earlier turn, sent back by the client."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # a JSON object, as a string


class FunctionCallOutputItem(RequestModel):
    """The client's result of running a tool call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningItem(RequestModel):
    """The model's reasoning in an earlier turn (an output item sent back); it goes to the template
    as the next assistant turn's reasoning_content."""

    type: Literal["reasoning"]
    summary: list[ContentPart] = Field(default_factory=list)
    content: list[ContentPart] | None = None


def _item_type(value) -> str | None:
    if isinstance(value, dict):
        return value.get("type") or "message"
    return getattr(value, "type", None) or "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]
INPUT_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


class FunctionTool(RequestModel):
    """A function tool in the Responses' flat form (no nested "function" object)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(RequestModel):
    type: Literal["function"]
    name: str


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError('a "json_schema" format needs "schema"')
        return self


class TextConfig(RequestModel):
    format: TextFormat | None = None


# Responses fields fp4serve does not implement: sent asking for something, they get a 400 naming them.
UNSUPPORTED = {
    "background": "background responses are not supported by fp4serve; send the request and wait for it",
    "conversation": "conversations are not supported by fp4serve; use previous_response_id",
    "prompt": "stored prompt templates are not supported by fp4serve",
    "top_logprobs": "logprobs are not supported by fp4serve's Responses API",
    "max_tool_calls": "max_tool_calls is not supported by fp4serve",
}


class ResponsesRequest(RequestModel):
    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data):
        if not isinstance(data, dict):
            return data
        for name, reason in UNSUPPORTED.items():
            if data.get(name) not in (None, False, 0, "", [], {}):
                raise APIError(400, reason, param=name, code="unsupported_parameter")
        if data.get("truncation") not in (None, "disabled"):
            raise APIError(400, 'only truncation "disabled" is supported by fp4serve', param="truncation",
                           code="unsupported_parameter")  # fmt: skip
        for i, tool in enumerate(data.get("tools") or []):
            if isinstance(tool, dict) and isinstance(tool.get("type"), str) and tool["type"] != "function":
                raise APIError(400, f"built-in tools ({tool['type']}) are not supported by fp4serve; only function "
                               "tools are", param=f"tools[{i}].type", code="unsupported_parameter")  # fmt: skip
        items = data.get("input")
        for i, item in enumerate(items if isinstance(items, list) else []):
            kind = _item_type(item) if isinstance(item, dict) else None
            if isinstance(kind, str) and kind not in INPUT_ITEM_TYPES:
                raise APIError(400, f"input items of type {kind!r} are not supported by fp4serve (supported: "
                               f"{', '.join(INPUT_ITEM_TYPES)})", param=f"input[{i}].type")  # fmt: skip
        return data

    model: str | None = None  # None: the first served model name
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True  # accepted; the model decides how many calls it writes
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None  # accepted: whether the model thinks is its template's (below)
    max_output_tokens: int | None = None
    temperature: float | None = sampling_range("temperature")
    top_p: float | None = sampling_range("top_p")
    stream: bool = False
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    # vLLM's extensions, as on the chat route
    top_k: int | None = None
    min_p: float | None = sampling_range("min_p")
    repetition_penalty: float | None = sampling_range("repetition_penalty")
    presence_penalty: float | None = sampling_range("presence_penalty")
    frequency_penalty: float | None = sampling_range("frequency_penalty")
    seed: int | None = None
    stop: str | list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}


# ---- the response -------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(OpenAIModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[dict] = Field(default_factory=list)
    logprobs: list[dict] = Field(default_factory=list)


class OutputMessage(OpenAIModel):
    id: str = Field(default_factory=lambda: new_id("msg"))
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningText(OpenAIModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class OutputReasoning(OpenAIModel):
    id: str = Field(default_factory=lambda: new_id("rs"))
    type: Literal["reasoning"] = "reasoning"
    status: ItemStatus = "in_progress"
    summary: list[dict] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)


class OutputFunctionCall(OpenAIModel):
    id: str = Field(default_factory=lambda: new_id("fc"))
    type: Literal["function_call"] = "function_call"
    status: ItemStatus = "in_progress"
    call_id: str = Field(default_factory=lambda: new_id("call"))
    name: str
    arguments: str = ""


OutputItem = Annotated[OutputMessage | OutputReasoning | OutputFunctionCall, Field(discriminator="type")]


class InputTokensDetails(OpenAIModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(OpenAIModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(OpenAIModel):
    id: str = Field(default_factory=lambda: new_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    background: bool = False
    model: str
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


class ResponseDeleted(OpenAIModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: Literal[True] = True
