"""What the HTTP server costs on top of the engine, and what constrained decoding costs.

Same workload three ways, on the embedded default model (SmolLM2-135M-Instruct, bf16): c chat
requests of `--max-tokens` tokens each (ignore_eos), (1) offline through LLMEngine, (2) streamed
over HTTP from a real uvicorn server by the official openai client, (3) the same with a
response_format json_schema (xgrammar masks every step). Prints aggregate output tok/s and, for HTTP,
mean time to first token; each figure is the best of --repeats runs (shared CPUs are noisy).
Run:  python benchmarks/server_overhead.py
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time

import openai
import uvicorn

from fp4serve.config import EngineConfig
from fp4serve.engine.async_engine import AsyncEngine
from fp4serve.engine.engine import LLMEngine
from fp4serve.sampling_params import SamplingParams
from fp4serve.server import build_app
from fp4serve.tokenizer import chat_prompt_ids

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}}, "required": ["items"]}


def offline(engine: LLMEngine, c: int, max_tokens: int) -> tuple[float, None]:
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": "List some fruits."}])
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for _ in range(c):
        engine.add_request({"prompt_token_ids": ids}, params)
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.delta_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start), None


async def over_http(url: str, c: int, max_tokens: int, structured: bool) -> tuple[float, float]:
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": SCHEMA}}} if structured else {}

    async def one(client: openai.AsyncOpenAI) -> tuple[int, float]:
        start = time.perf_counter()
        first = None
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "List some fruits."}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **extra,
        )  # fmt: skip
        tokens = 0
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        return tokens, first or 0.0

    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client) for _ in range(c)))
        elapsed = time.perf_counter() - start
    return sum(t for t, _ in results) / elapsed, sum(f for _, f in results) / c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(dtype="bfloat16", max_model_len=1024, kv_cache_memory="256MiB"))
    rows = []
    offline(engine, 2, 8)  # warm-up
    for c in args.concurrency:
        rows.append(("offline engine", c, max(offline(engine, c, args.max_tokens)[0] for _ in range(args.repeats)), None))

    async_engine = AsyncEngine(engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(async_engine, ["m"]), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        for structured in (False, True):
            asyncio.run(over_http(url, 1, 8, structured))  # warm-up (and the grammar compiler's first build)
            for c in args.concurrency:
                runs = [asyncio.run(over_http(url, c, args.max_tokens, structured)) for _ in range(args.repeats)]
                rate, ttft = max(runs)
                rows.append(("HTTP stream" + (" + json_schema" if structured else ""), c, rate, ttft))
    finally:
        server.should_exit = True
        thread.join()
        async_engine.shutdown()

    print("\n| path | concurrency | output tok/s | mean TTFT (s) |\n| --- | ---: | ---: | ---: |")
    for name, c, rate, ttft in rows:
        print(f"| {name} | {c} | {rate:.1f} | {'' if ttft is None else f'{ttft:.3f}'} |")


if __name__ == "__main__":
    main()
