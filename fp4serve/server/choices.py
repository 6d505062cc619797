"""The choices of one HTTP request: prompts x n engine requests (vLLM V1's parallel sampling: each
of the n choices of a prompt is its own engine request, SamplingParams.child(j)), in choice order
(prompt i's choice j is choice i * n + j, vLLM's order).

They start together and end together: a refused choice refuses the request, and one that fails
(or a client that goes away, or a close) aborts every other, so none outlives the response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fp4serve.engine.async_engine import AsyncEngine, RequestStream
from fp4serve.outputs import RequestOutput
from fp4serve.sampling_params import SamplingParams
from fp4serve.server.protocol import APIError

MAX_CHOICES = 1024  # prompts x n in one request: fp4serve's bound, far past any batch a client sends


def check_num_choices(num_prompts: int, n: int, max_queue: int | None, max_num_seqs: int) -> int:
    """prompts x n, or a 400 when it is out of bounds (n itself first, so n=0 names n)."""
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n must be in [1, {MAX_CHOICES}], got {n}", param="n")
    choices = num_prompts * n
    if choices > MAX_CHOICES:
        raise APIError(400, f"this request asks for {choices} choices ({num_prompts} prompts x n={n}); "
                            f"at most {MAX_CHOICES} per request", param="n" if num_prompts == 1 else "prompt")  # fmt: skip
    # Each choice counts against --max-queue as a request; more than the queue and the free slots
    # together could ever take would be refused with 503 forever.
    if max_queue is not None and choices > max_queue + max_num_seqs:
        raise APIError(400, f"this request asks for {choices} choices; with --max-queue {max_queue} and "
                            f"--max-num-seqs {max_num_seqs} the server takes at most {max_queue + max_num_seqs}",
                       param="n" if num_prompts == 1 else "prompt")  # fmt: skip
    return choices


def fan_out(prompts: list[dict], params: list[SamplingParams]) -> list[tuple[dict, SamplingParams]]:
    """(prompt, params) per choice, in choice order: prompts[i] with params[i].child(j) for j < n."""
    return [
        (prompt, prompt_params.child(j) if prompt_params.n > 1 else prompt_params)
        for prompt, prompt_params in zip(prompts, params)
        for j in range(prompt_params.n)
    ]


class Choices:
    """The engine requests of one response's choices; iterate `outputs()`, `close()` when done."""

    def __init__(self, streams: list[RequestStream]):
        self.streams = streams

    @classmethod
    async def start(cls, engine: AsyncEngine, requests: list[tuple[dict, SamplingParams]], request_id: str) -> Choices:
        """One engine request per (prompt, params) of fan_out(); ids `request_id-i` when there are several."""
        ids = [request_id] if len(requests) == 1 else [f"{request_id}-{i}" for i in range(len(requests))]
        return cls(await engine.add_requests([(prompt, params, i) for (prompt, params), i in zip(requests, ids)]))

    def close(self) -> None:
        """Abort every choice that has not finished. Safe to call more than once."""
        for stream in self.streams:
            stream.close()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them. A choice that fails raises here,
        and leaving the iteration early (error, cancellation) aborts the choices still running."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    queue.put_nowait((index, output))
            except Exception as error:
                queue.put_nowait((index, error))
            queue.put_nowait((index, None))

        pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        running = len(pumps)
        try:
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in pumps:
                task.cancel()
            self.close()

    async def final_outputs(self) -> list[RequestOutput]:
        """Each choice's last output (the whole text), in choice order."""
        final: list[RequestOutput | None] = [None] * len(self.streams)
        async for index, output in self.outputs():
            final[index] = output
        return final
