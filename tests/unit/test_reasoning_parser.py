"""The qwen3 reasoning parser, streamed with chunk boundaries at every position, against a plain
whole-text reference written from the format's definition."""

from __future__ import annotations

import pytest

from fp4serve.server.reasoning import Qwen3ReasoningParser, prompt_opens_reasoning


def reference(text: str, starts_in_reasoning: bool) -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    if not starts_in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith("<think>"):
            return "", text
        text = stripped[len("<think>") :]
    reasoning, _, content = text.partition("</think>")
    return reasoning, content


def run(chunks: list[str], starts_in_reasoning: bool) -> tuple[str, str]:
    parser = Qwen3ReasoningParser(starts_in_reasoning)
    reasoning = content = ""
    for chunk in chunks:
        r, c = parser.feed(chunk)
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


TEXTS = [
    "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?",
    "  <think>short</think>answer",
    "plain answer, no reasoning at all",
    "a < b and </thi is not a tag",
    "<think>never closed, cut off by max_tokens",
    "<think></think>",
    "<thin",
    "",
    "The template opened the block.\n</think>\n\nThe answer is 4.",
    "reasoning with a stray <think> inside </think> content with </think> again",
]


@pytest.mark.parametrize("starts_in_reasoning", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_every_split_matches_the_whole_text(text, starts_in_reasoning):
    expected = reference(text, starts_in_reasoning)
    assert run([text], starts_in_reasoning) == expected
    assert run(list(text), starts_in_reasoning) == expected  # one character at a time
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert run([text[:i], text[i:j], text[j:]], starts_in_reasoning) == expected, (i, j)


def test_examples():
    assert run(["<think>\nhm\n</think>\n\nHi"], False) == ("\nhm\n", "\n\nHi")
    assert run(["so 2+2=4\n</think>\n\n4"], True) == ("so 2+2=4\n", "\n\n4")
    assert run(["4"], False) == ("", "4")  # enable_thinking false: the template closed the block in the prompt


def test_nothing_is_streamed_before_it_is_decided():
    parser = Qwen3ReasoningParser(starts_in_reasoning=False)
    assert parser.feed("  <thi") == ("", "")  # could still open a block
    assert parser.feed("nk>abc</th") == ("abc", "")  # "</th" could still close it
    assert parser.feed("ink>x") == ("", "x")


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking false
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
