"""The parsed reply (reasoning, content, tool calls; chat.ReplyParser) -> Responses output items, in
the order the model wrote them, and the stream events that build them (OpenAI's sequence):

    reasoning      output_item.added, content_part.added, reasoning_text.delta..., reasoning_text.done,
                   content_part.done, output_item.done
    message        output_item.added, content_part.added, output_text.delta..., output_text.done,
                   content_part.done, output_item.done
    function_call  output_item.added, function_call_arguments.delta, function_call_arguments.done,
                   output_item.done   (a call arrives whole when its closing tag is generated)

An item is closed when the next kind begins. Whitespace-only content that a message has not begun
with yet (the "\\n\\n" between </think> and a tool call) is held and dropped unless more text follows
it, or the reply has nothing else to say. The non-streaming answer is built by the same code from
the same deltas, so both agree.
"""

from __future__ import annotations

from fp4serve.server.responses_protocol import (
    OutputFunctionCall,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
)
from fp4serve.server.tools import ParsedToolCall


class OutputBuilder:
    def __init__(self):
        self.items: list = []
        self._open = None  # the item text is being added to (a reasoning or message item)
        self._held = ""  # whitespace content no message has begun with yet
        self.reasoning_text = ""

    def add(self, reasoning: str, content: str, calls: list[ParsedToolCall]) -> list[dict]:
        """The events for one parsed delta; the items grow with it."""
        events: list[dict] = []
        if reasoning:
            self.reasoning_text += reasoning
            item = self._opened(OutputReasoning, ReasoningText, events)
            item.content[0].text += reasoning
            events.append(self._part_event("response.reasoning_text.delta", item, delta=reasoning))
        if content:
            if isinstance(self._open, OutputMessage):
                self._append_text(content, events)
            else:
                self._held += content
                if self._held.strip():
                    held, self._held = self._held, ""
                    self._opened(OutputMessage, OutputText, events)
                    self._append_text(held, events)
        for call in calls:
            self._close("completed", events)
            self._held = ""
            item = OutputFunctionCall(name=call.name)
            index = self._add_item(item, events)
            item.arguments = call.arguments
            ids = {"item_id": item.id, "output_index": index}
            events.append({"type": "response.function_call_arguments.delta", **ids, "delta": call.arguments})
            events.append({"type": "response.function_call_arguments.done", **ids, "arguments": call.arguments})
            item.status = "completed"
            events.append({"type": "response.output_item.done", "output_index": index, "item": _dump(item)})
        return events

    def finish(self, status: str) -> list[dict]:
        """Close the last item with the response's status ("completed" or "incomplete"). A reply
        with no message and no call still answers with a message (its text possibly empty),
        unless all it wrote was reasoning."""
        events: list[dict] = []
        says_nothing = not any(isinstance(i, (OutputMessage, OutputFunctionCall)) for i in self.items)
        if says_nothing and (self._held or not self.items):
            self._opened(OutputMessage, OutputText, events)
            if self._held:
                self._append_text(self._held, events)
        self._held = ""
        self._close(status, events)
        return events

    @property
    def output_text(self) -> str:
        return "".join(p.text for i in self.items if isinstance(i, OutputMessage) for p in i.content)

    # ---- items ----------------------------------------------------------------------------------
    def _opened(self, kind, part_kind, events: list[dict]):
        if isinstance(self._open, kind):
            return self._open
        self._close("completed", events)
        item = kind()
        index = self._add_item(item, events)
        part = part_kind()
        item.content.append(part)
        events.append({"type": "response.content_part.added", "item_id": item.id, "output_index": index,
                       "content_index": 0, "part": _dump(part)})  # fmt: skip
        self._open = item
        return item

    def _add_item(self, item, events: list[dict]) -> int:
        self.items.append(item)
        events.append({"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": _dump(item)})
        return len(self.items) - 1

    def _append_text(self, text: str, events: list[dict]) -> None:
        self._open.content[0].text += text
        events.append(self._part_event("response.output_text.delta", self._open, delta=text, logprobs=[]))

    def _close(self, status: str, events: list[dict]) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        part = item.content[0]
        if isinstance(item, OutputMessage):
            events.append(self._part_event("response.output_text.done", item, text=part.text, logprobs=[]))
        else:
            events.append(self._part_event("response.reasoning_text.done", item, text=part.text))
        events.append(self._part_event("response.content_part.done", item, part=_dump(part)))
        item.status = status
        events.append({"type": "response.output_item.done", "output_index": self._index(item), "item": _dump(item)})

    def _part_event(self, kind: str, item, **fields) -> dict:
        return {"type": kind, "item_id": item.id, "output_index": self._index(item), "content_index": 0, **fields}

    def _index(self, item) -> int:
        return next(i for i, candidate in enumerate(self.items) if candidate is item)


def _dump(model) -> dict:
    return model.model_dump(mode="json")
