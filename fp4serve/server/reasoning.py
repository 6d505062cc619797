"""Reasoning parser `qwen3`: the text inside <think>...</think> becomes `reasoning_content`.

Qwen3 models either write the <think> tag themselves, or (Qwen3.5/3.6, Qwen3-2507 thinking models)
the chat template already opened the block at the end of the prompt, so the output starts inside
it. The parser is told which by the prompt itself (`prompt_opens_reasoning`), so a template that
closed an empty block (`enable_thinking: false`) gives no reasoning at all.

It is fed text deltas as they stream and returns (reasoning, content) deltas. A tag can arrive split
across deltas, so a tail that could still become a tag is held back until the next delta (or
`finish`). Fed the whole text at once, it gives the non-streaming answer: both paths are one code.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def prompt_opens_reasoning(prompt_tail: str) -> bool:
    """Whether the prompt ends inside an open think block (the template opened it for the model)."""
    return prompt_tail.rfind(START) > prompt_tail.rfind(END)


class Qwen3ReasoningParser:
    def __init__(self, starts_in_reasoning: bool):
        # "start": the output may still open a block with <think>; "reasoning"; "content": for good.
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Return the (reasoning, content) text that `text` completes."""
        self._buffer += text
        reasoning = content = ""
        if self._state == "start":
            stripped = self._buffer.lstrip()
            if stripped.startswith(START):
                self._state, self._buffer = "reasoning", stripped[len(START) :]
            elif START.startswith(stripped):
                return "", ""  # only whitespace or the beginning of <think> so far
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = self._buffer.find(END)
            if end < 0:
                keep = partial_tag_length(self._buffer, END)
                reasoning, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
                return reasoning, ""
            reasoning, self._buffer = self._buffer[:end], self._buffer[end + len(END) :]
            self._state = "content"
        content, self._buffer = self._buffer, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The text held back at the end of the output: a cut-off tag is plain text of its part."""
        held, self._buffer = self._buffer, ""
        return (held, "") if self._state == "reasoning" else ("", held)


REASONING_PARSERS = {"qwen3": Qwen3ReasoningParser}
