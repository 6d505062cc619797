"""Per-request CPU work (tokenizing, rendering the chat template) on a few worker threads instead
of the event loop, behind a cheap length bound that refuses an obviously oversized prompt before
any of it runs.

Tokenizing a 15 MB prompt takes seconds; on the event loop it would stall /health and every
stream for that long. The tokenizers library releases the GIL while it encodes, so worker threads
keep the loop free. The bound: no token of the vocabulary is longer than `longest_token` characters
(byte-level BPE and SentencePiece tokens cover at most one character per stored character), so a
text of more than max_model_len * longest_token characters cannot fit; NORMALIZER_SLACK covers
normalizers (NFKC) that merge a few characters into one before splitting."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fp4serve.server.protocol import APIError

NORMALIZER_SLACK = 4
WORKERS = 2  # tokenizing is a small share of a request's time; more threads would only contend

T = TypeVar("T")


def longest_token(tokenizer) -> int:
    """The most characters one token of the vocabulary stands for (special tokens included)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


class PromptWork:
    def __init__(self, tokenizer, max_model_len: int, workers: int = WORKERS):
        self.max_model_len = max_model_len
        self.max_chars = max_model_len * longest_token(tokenizer) * NORMALIZER_SLACK
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="fp4serve-prompt")

    def check_length(self, num_chars: int, param: str) -> None:
        """400 for a text too long to fit max_model_len tokens however it tokenizes."""
        if num_chars > self.max_chars:
            raise APIError(
                400,
                f"the prompt has {num_chars} characters: more than any tokenization of it can fit in "
                f"max_model_len {self.max_model_len} tokens",
                param=param,
            )

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on a worker thread; its exception (an APIError too) is raised here."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def chat_length(request, exclude_images: bool = False) -> int:
    """An upper bound on the characters the chat template renders from a request's own content:
    its messages and tools as JSON (every field the template may read, quotes and escapes
    included, so never less than the text itself). exclude_images: less the image URLs (a data:
    URL's base64 becomes image tokens, not text), for callers that count image tokens elsewhere."""
    length = len(request.model_dump_json(include={"messages", "tools"}))
    if exclude_images:
        for message in request.messages:
            for part in message.content if isinstance(message.content, list) else ():
                url = getattr(part, "image_url", None)
                url = url.get("url") if isinstance(url, dict) else url
                length -= len(url) if part.type == "image_url" and isinstance(url, str) else 0
    return length
