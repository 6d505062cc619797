"""Stored responses for previous_response_id and GET/DELETE /v1/responses/{id}: in this process only,
a bounded LRU (ServerOptions.responses_store_size entries; the least recently used id is forgotten
first).

Each entry keeps its own turn (the new input items and the output) and a reference to the entry it
continued, so a chain costs memory linear in its length. An entry that drops out of the index stays
reachable from the newer turns that continue it: a live conversation never loses its beginning.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from fp4serve.server.protocol import ContentPart
from fp4serve.server.responses_protocol import (
    FunctionCallItem,
    MessageItem,
    OutputFunctionCall,
    OutputMessage,
    ReasoningItem,
    ResponseObject,
)


@dataclass
class StoredResponse:
    response: ResponseObject
    input_items: list  # this turn's own input items (parsed), without the instructions
    previous: StoredResponse | None

    def conversation(self) -> list:
        """Every turn's input and output items, oldest first: what a turn continuing this one sees.
        (OpenAI's rule: each turn's instructions are its own, not carried on.)"""
        turns, entry = [], self
        while entry is not None:
            turns.append(entry.input_items + as_input_items(entry.response.output))
            entry = entry.previous
        return [item for turn in reversed(turns) for item in turn]


def as_input_items(output: list) -> list:
    """Output items as the input items a client would send back."""
    items = []
    for item in output:
        if isinstance(item, OutputMessage):
            items.append(MessageItem(type="message", role="assistant", content="".join(p.text for p in item.content)))
        elif isinstance(item, OutputFunctionCall):
            items.append(FunctionCallItem(type="function_call", call_id=item.call_id, name=item.name,
                                          arguments=item.arguments))  # fmt: skip
        else:
            text = "".join(p.text for p in item.content)
            items.append(ReasoningItem(type="reasoning", content=[ContentPart(type="reasoning_text", text=text)]))
    return items


class ResponseStore:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, entry: StoredResponse) -> None:
        if self.max_entries == 0:
            return
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._entries)
