"""Tool-call parsers: the model's tool-call text -> OpenAI `tool_calls` (vLLM's parser names).

    hermes       <tool_call>{"name": "f", "arguments": {...}}</tool_call>
    qwen3_coder  <tool_call><function=f><parameter=key>value</parameter>...</function></tool_call>
                 (alias qwen3_xml); values are typed by the tool's JSON schema

Both wrap each call in <tool_call>...</tool_call>, so one streaming scanner serves both: text
outside the tags streams as content (a tail that could be the start of <tool_call> is held back
until it is decided), a call is emitted whole when its closing tag arrives, and a call that does
not parse goes back to the client as the plain text it was, never an error. Fed the whole output
at once, the same scanner gives the non-streaming answer.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass

from fp4serve.server.reasoning import partial_tag_length

START, END = "<tool_call>", "</tool_call>"


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's wire format)
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCallParser:
    """Streaming scanner for <tool_call> blocks; subclasses parse one block's body."""

    def __init__(self, tools: list[dict]):
        # name -> JSON schema of its parameters
        self.schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
        self._buffer = ""
        self._inside = False

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """Return the content and the complete tool calls that `text` makes available."""
        self._buffer += text
        content, calls = "", []
        while True:
            if not self._inside:
                start = self._buffer.find(START)
                if start < 0:
                    keep = partial_tag_length(self._buffer, START)
                    split = len(self._buffer) - keep
                    content += self._buffer[:split]
                    self._buffer = self._buffer[split:]
                    return content, calls
                content += self._buffer[:start]
                self._buffer = self._buffer[start + len(START) :]
                self._inside = True
            end = self._buffer.find(END)
            if end < 0:
                return content, calls
            body, self._buffer = self._buffer[:end], self._buffer[end + len(END) :]
            self._inside = False
            call = self._parse_or_none(body)
            if call is None:
                content += START + body + END  # not a call after all: the client sees the text
            else:
                calls.append(call)

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """Content held back at the end: an unclosed call is returned as the text it was."""
        held = (START if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        return held, []

    def _parse_or_none(self, body: str) -> ParsedToolCall | None:
        try:
            return self.parse_call(body)
        except (ValueError, TypeError, KeyError, SyntaxError):
            return None

    def parse_call(self, body: str) -> ParsedToolCall | None:
        raise NotImplementedError


class HermesToolParser(ToolCallParser):
    def parse_call(self, body: str) -> ParsedToolCall | None:
        call = json.loads(body)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments already as a JSON string
            arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            return None
        return ParsedToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


_FUNCTION = re.compile(r"^\s*<function=([^>\n]+)>(.*?)(?:</function>\s*)?$", re.DOTALL)
# A value ends at its closing tag, or (models sometimes forget it) where the next parameter begins.
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


class Qwen3CoderToolParser(ToolCallParser):
    def parse_call(self, body: str) -> ParsedToolCall | None:
        match = _FUNCTION.match(body)
        if match is None:
            return None
        name, inner = match.group(1).strip(), match.group(2)
        if "<function=" in inner:
            return None
        properties = self.schemas.get(name, {}).get("properties", {})
        arguments = {}
        for key, raw in _PARAMETER.findall(inner):
            key = key.strip()
            arguments[key] = convert_value(_strip_one_newline(raw), properties.get(key, {}))
        return ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _strip_one_newline(value: str) -> str:
    """The model writes each value on its own lines: drop the one newline on each side."""
    return value.removeprefix("\n").removesuffix("\n")


def convert_value(value: str, schema: dict):
    """A parameter's text as the JSON type its schema declares (vLLM qwen3_coder's rules); a value
    without a schema, or that does not convert, stays a string."""
    types = schema.get("type", "string")
    types = [types] if isinstance(types, str) else list(types)
    if value.strip().lower() == "null" and ("null" in types or "string" not in types):
        return None
    text = value.strip()
    for kind in types:
        try:
            if kind == "integer":
                return int(text)
            if kind == "number":
                number = float(text)
                return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
            if kind == "boolean" and text.lower() in ("true", "false"):
                return text.lower() == "true"
            if kind in ("object", "array"):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return ast.literal_eval(text)  # Python-style dicts and lists
        except (ValueError, SyntaxError):
            continue
    return value


class ForcedToolCalls:
    """The output of a request whose tool_choice forced a call, decoded under a JSON grammar:
    "required" gives [{"name": ..., "parameters": {...}}, ...] (vLLM's shape), a named function gives
    its arguments object. Nothing streams before the end, where the JSON becomes the calls (or, if
    it was cut off, plain content)."""

    def __init__(self, function_name: str | None):
        self.function_name = function_name  # None: "required"
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        self._buffer += text
        return "", []

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        text, self._buffer = self._buffer, ""
        try:
            value = json.loads(text)
            if self.function_name is not None:
                calls = [ParsedToolCall(self.function_name, json.dumps(value, ensure_ascii=False))]
            else:
                calls = [ParsedToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]
        except (ValueError, TypeError, KeyError):
            return text, []
        return "", calls


def required_tool_calls_schema(tools: list[dict]) -> dict:
    """JSON schema of a non-empty list of calls to the given tools (what tool_choice "required" decodes)."""
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]},
                           "parameters": t["function"].get("parameters") or {"type": "object"}},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}


TOOL_PARSERS = {"hermes": HermesToolParser, "qwen3_coder": Qwen3CoderToolParser, "qwen3_xml": Qwen3CoderToolParser}
