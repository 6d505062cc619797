"""One streamed request over HTTP, timed on the client's monotonic clock.

Speaks plain OpenAI JSON and server-sent events (parsed here, no SDK), so any compatible server
(fp4serve, vLLM, SGLang, llama.cpp's llama-server) is measured the same way. Token counts come from
the stream's final `usage` (we ask for it with stream_options.include_usage); a server that does
not send usage falls back to counting content chunks and the result says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class BenchRequest:
    category: str
    prompt: str
    max_tokens: int
    temperature: float
    ignore_eos: bool = False
    seed: int | None = None


@dataclass
class RequestResult:
    category: str
    temperature: float
    concurrency: int
    start_s: float  # since the level started
    e2e_s: float
    ttft_s: float | None = None  # to the first chunk that carries text
    itl_s: list[float] = field(default_factory=list)  # gaps between text chunks after the first
    prompt_tokens: int | None = None
    output_tokens: int = 0
    usage_reported: bool = False
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.error or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def decode_tok_s(self) -> float | None:
        tpot = self.tpot_s
        return 1.0 / tpot if tpot else None

    @property
    def prefill_tok_s(self) -> float | None:
        if self.error or not self.ttft_s or not self.prompt_tokens:
            return None
        return self.prompt_tokens / self.ttft_s

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "tpot_s": self.tpot_s,
            "decode_tok_s": self.decode_tok_s,
            "prefill_tok_s": self.prefill_tok_s,
        }


def request_body(request: BenchRequest, model: str, chat: bool) -> dict:
    body = {
        "model": model,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    if request.ignore_eos:
        body["ignore_eos"] = True  # vLLM's and llama.cpp's extension; the random workload needs exact lengths
    if request.seed is not None:
        body["seed"] = request.seed
    return body


def _chunk_text(event: dict, chat: bool) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    if chat:
        delta = choices[0].get("delta") or {}
        # Reasoning parsers stream thinking separately; it is generated tokens all the same.
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choices[0].get("text") or ""


def _error_message(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {status}: {message or body.decode(errors='replace')[:300].strip() or 'no body'}"


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict, chat: bool, result: RequestResult, level_start: float
) -> RequestResult:
    """POST `body` to `url` as a stream and fill `result`; every failure ends up in result.error."""
    start = time.perf_counter()
    result.start_s = start - level_start
    last = None
    text_chunks = 0
    done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = _error_message(response.status_code, await response.aread())
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event: lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        result.error = f"malformed SSE event: {data[:200]}"
                        break
                    if event.get("error"):
                        result.error = "stream error: " + str(_error_text(event["error"]))
                        break
                    now = time.perf_counter()
                    if _chunk_text(event, chat):
                        text_chunks += 1
                        if last is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                    usage = event.get("usage")
                    if usage:
                        result.prompt_tokens = usage.get("prompt_tokens")
                        result.output_tokens = usage.get("completion_tokens") or 0
                        result.usage_reported = True
                if result.error is None and not done:
                    result.error = "stream ended before data: [DONE]"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    result.e2e_s = time.perf_counter() - start
    if not result.usage_reported:
        result.output_tokens = text_chunks  # the server sent no usage: chunks are the best we have
    if result.error:
        result.itl_s = []
    return result


def _error_text(error) -> str:
    return error.get("message", error) if isinstance(error, dict) else error
