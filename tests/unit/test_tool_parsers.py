"""Tool-call parsers (hermes, qwen3_coder), streamed with chunk boundaries at every position: the
calls and the content must be the same however the text arrives."""

from __future__ import annotations

import json

import pytest

from fp4serve.server.tools import HermesToolParser, Qwen3CoderToolParser, convert_value

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "hot": {"type": "number"},
                "metric": {"type": "boolean"},
                "where": {"type": "object"},
                "hours": {"type": "array"},
                "note": {"type": ["string", "null"]},
            },
        },
    },
}


def run(parser_class, chunks: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    parser = parser_class([WEATHER])
    content, calls = "", []
    for chunk in chunks:
        text, new = parser.feed(chunk)
        content += text
        calls += new
    tail, more = parser.finish()
    content, calls = content + tail, calls + more
    for call in calls:
        assert call.id.startswith("chatcmpl-tool-")
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def assert_split_invariant(parser_class, text: str, expected) -> None:
    assert run(parser_class, [text]) == expected
    assert run(parser_class, list(text)) == expected
    for i in range(len(text) + 1):
        assert run(parser_class, [text[:i], text[i:]]) == expected, i


HERMES_CASES = [
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
        ("Let me check.\n", [("get_weather", {"city": "Paris", "days": 3})]),
    ),
    (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>',
        ("\n", [("a", {}), ("b", {"x": 1})]),
    ),
    ('<tool_call>{"name": "a"</tool_call> after', ('<tool_call>{"name": "a"</tool_call> after', [])),  # malformed
    ('<tool_call>{"arguments": {}}</tool_call>', ('<tool_call>{"arguments": {}}</tool_call>', [])),  # no name
    ('text <tool_call>{"name": "a", "argu', ('text <tool_call>{"name": "a", "argu', [])),  # cut off
    ("ends with <tool_ca", ("ends with <tool_ca", [])),
    ("a < b, <tool> is not a call", ("a < b, <tool> is not a call", [])),
]


@pytest.mark.parametrize("text, expected", HERMES_CASES)
def test_hermes(text, expected):
    assert_split_invariant(HermesToolParser, text, expected)


QWEN3_CODER = (
    "I will look it up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=hot>\n30.5\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n"
    '<parameter=where>\n{"lat": 37.7, "lon": -122.4}\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n'
    "<parameter=note>\nnull\n</parameter>\n<parameter=extra>\nline one\nline two\n</parameter>\n"
    "</function>\n</tool_call>"
)


def test_qwen3_coder_types_values_by_schema():
    expected_args = {
        "city": "San Francisco", "days": 3, "hot": 30.5, "metric": True, "where": {"lat": 37.7, "lon": -122.4},
        "hours": [1, 2], "note": None, "extra": "line one\nline two",
    }  # fmt: skip
    assert_split_invariant(Qwen3CoderToolParser, QWEN3_CODER, ("I will look it up.\n", [("get_weather", expected_args)]))


@pytest.mark.parametrize(
    "text, expected",
    [
        # a forgotten </parameter> ends at the next parameter
        (
            "<tool_call><function=get_weather><parameter=city>Oslo<parameter=days>2</parameter></function></tool_call>",
            ("", [("get_weather", {"city": "Oslo", "days": 2})]),
        ),
        # an unknown function has no schema: its values stay strings (as in vLLM)
        (
            "<tool_call>\n<function=other>\n<parameter=n>\n7\n</parameter>\n</function>\n</tool_call>",
            ("", [("other", {"n": "7"})]),
        ),
        ("<tool_call>no function here</tool_call>", ("<tool_call>no function here</tool_call>", [])),
        ("<tool_call><function=a></function><function=b></function></tool_call>",
         ("<tool_call><function=a></function><function=b></function></tool_call>", [])),
    ],
)
def test_qwen3_coder_edge_cases(text, expected):
    assert_split_invariant(Qwen3CoderToolParser, text, expected)


def test_convert_value():
    assert convert_value("12", {"type": "integer"}) == 12
    assert convert_value("twelve", {"type": "integer"}) == "twelve"  # does not convert: stays text
    assert convert_value("1e3", {"type": "number"}) == 1000.0
    assert convert_value("false", {"type": "boolean"}) is False
    assert convert_value("{'a': 1}", {"type": "object"}) == {"a": 1}  # Python-style dict
    assert convert_value("null", {"type": "string"}) == "null"
    assert convert_value(" spaced ", {"type": "string"}) == " spaced "
