"""Responses input items -> chat messages, which the chat template renders as for /v1/chat/completions.

    message (user, system, developer, assistant)  -> a message; developer is the template's system
    function_call                                 -> a tool call of the assistant turn it follows
    function_call_output                          -> a tool message
    reasoning                                     -> reasoning_content of the next assistant turn

Leading system text (the request's instructions, then system or developer messages) becomes one
system message: templates such as Qwen3.5's refuse a system message anywhere but first.
"""

from __future__ import annotations

import json

from fp4serve.server.protocol import APIError, ContentPart
from fp4serve.server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ReasoningItem,
)

TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")
_NOT_TEXT = {"input_image": "images", "image_url": "images", "input_file": "files", "input_audio": "audio"}


def chat_messages(instructions: str | None, items: list[tuple[object, str | None]]) -> list[dict]:
    """The conversation as chat messages. `items` pairs each input item with its place in the
    request ("input[3]") for error params; None for items of a stored earlier turn."""
    messages: list[dict] = []
    reasoning = ""  # a reasoning item's text waits for the assistant turn it belongs to
    for item, where in items:
        if isinstance(item, ReasoningItem):
            reasoning += _text(item.content or item.summary, f"{where}.content")
            continue
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            message = {"role": role, "content": _text(item.content, f"{where}.content")}
            if role == "assistant":
                message, reasoning = _with_reasoning(message, reasoning), ""
            messages.append(message)
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": _arguments(item.arguments, f"{where}.arguments")}}  # fmt: skip
            if messages and messages[-1]["role"] == "assistant":  # the text or the calls just before it
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append(_with_reasoning({"role": "assistant", "content": "", "tool_calls": [call]}, reasoning))
                reasoning = ""
        elif isinstance(item, FunctionCallOutputItem):
            output = _text(item.output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return _one_leading_system(instructions, messages)


def _with_reasoning(message: dict, reasoning: str) -> dict:
    return {**message, "reasoning_content": reasoning} if reasoning else message


def _one_leading_system(instructions: str | None, messages: list[dict]) -> list[dict]:
    texts = [instructions] if instructions else []
    first = 0
    while first < len(messages) and messages[first]["role"] == "system":
        texts.append(messages[first]["content"])
        first += 1
    system = [{"role": "system", "content": "\n\n".join(texts)}] if texts else []
    return system + messages[first:]


def _text(content: str | list[ContentPart], where: str | None) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        kind, param = part.type, where and f"{where}[{i}]"
        if kind in _NOT_TEXT:
            raise APIError(400, f"{_NOT_TEXT[kind]} are not supported by this model: send text only", param=param)
        text = getattr(part, "refusal" if kind == "refusal" else "text", None)
        if kind not in TEXT_PARTS + ("refusal",):
            raise APIError(400, f"content parts of type {kind!r} are not supported", param=param)
        if not isinstance(text, str):
            field = "refusal" if kind == "refusal" else "text"
            raise APIError(400, f"a {kind} content part needs a string `{field}`", param=where and f"{param}.{field}")
        texts.append(text)
    return "\n".join(texts)


def _arguments(arguments: str, where: str | None) -> dict:
    """Templates iterate a call's arguments as a mapping (chat.py does the same for chat requests)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise APIError(400, f"function call arguments are not valid JSON: {e}", param=where) from e
    if not isinstance(value, dict):
        raise APIError(400, "function call arguments must be a JSON object", param=where)
    return value
