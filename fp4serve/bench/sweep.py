"""The sweep: for each temperature, each category and each concurrency level, keep `c` requests in
flight until the level's prompts (or its duration) are used up; scrape /metrics around each level.
Long-context tiers run single-stream after the categories."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from fp4serve.bench import spec_metrics
from fp4serve.bench.client import BenchRequest, RequestResult, request_body, send_request
from fp4serve.bench.stats import summarize_level
from fp4serve.bench.workloads import Prompt


@dataclass
class SweepConfig:
    base_url: str  # the OpenAI root, ending in /v1
    model: str
    chat: bool = True
    api_key: str | None = None
    concurrency: tuple[int, ...] = (1, 4, 16)
    num_prompts: int | None = None  # per level; None: 2 x concurrency, at least 8
    duration: float | None = None  # per level, seconds; replaces num_prompts
    max_tokens: int = 128
    temperatures: tuple[float, ...] = (0.0,)
    warmup: int = 2
    seed: int = 0
    ignore_eos: bool = False
    request_timeout: float = 600.0
    progress: bool = True

    @property
    def root_url(self) -> str:
        """Where /metrics, /health and /tokenize live: the base URL without its /v1."""
        url = self.base_url.rstrip("/")
        return url.removesuffix("/v1")

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + ("/chat/completions" if self.chat else "/completions")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def level_size(self, concurrency: int) -> int:
        return self.num_prompts or max(8, 2 * concurrency)


@dataclass
class Level:
    """One measured level: what ran, its summary, its raw results and the drafting counters."""

    kind: str  # "category" or "long_context"
    category: str
    concurrency: int
    temperature: float
    summary: dict
    results: list[RequestResult]
    spec_delta: dict

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "category": self.category,
            "concurrency": self.concurrency,
            "temperature": self.temperature,
            **self.summary,
            "spec_decode_counters": self.spec_delta,
            "spec_decode": spec_metrics.acceptance(self.spec_delta),
        }


def make_request(prompt: Prompt, config: SweepConfig, temperature: float, index: int) -> BenchRequest:
    return BenchRequest(
        category=prompt.category,
        prompt=prompt.text,
        max_tokens=prompt.max_tokens or config.max_tokens,
        temperature=temperature,
        ignore_eos=prompt.ignore_eos or config.ignore_eos,
        # Sampled runs are repeatable on servers that honour per-request seeds; greedy needs none.
        seed=config.seed + index if temperature > 0 else None,
    )


async def run_level(
    client: httpx.AsyncClient,
    config: SweepConfig,
    prompts: list[Prompt],
    concurrency: int,
    temperature: float,
    label: str,
    count: int | None = None,
) -> tuple[list[RequestResult], float]:
    """`concurrency` workers send the level's requests back to back (prompts taken in order, cycling):
    `count` of them, else --duration's worth, else the config's level size. Returns the results in
    issue order and the wall time from the first send to the last answer."""
    total = count or (None if config.duration else config.level_size(concurrency))
    results: list[RequestResult] = []
    bar = tqdm(total=total, desc=label, unit="req", disable=not config.progress, leave=True)
    level_start = time.perf_counter()
    deadline = level_start + config.duration if config.duration else None
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while True:
            if (total is not None and next_index >= total) or (deadline and time.perf_counter() >= deadline):
                return
            index = next_index
            next_index += 1
            request = make_request(prompts[index % len(prompts)], config, temperature, index)
            result = RequestResult(request.category, temperature, concurrency, start_s=0.0, e2e_s=0.0)
            results.append(result)
            await send_request(
                client,
                config.endpoint,
                request_body(request, config.model, config.chat),
                config.chat,
                result,
                level_start,
            )
            bar.update(1)
            if result.error:
                bar.set_postfix(errors=sum(1 for r in results if r.error))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.close()
    ends = [r.start_s + r.e2e_s for r in results]
    wall = max(ends) - min(r.start_s for r in results) if results else 0.0
    return results, wall


async def run_sweep(
    config: SweepConfig, workload: dict[str, list[Prompt]], long_context: dict[str, list[Prompt]] | None = None
) -> list[Level]:
    """The levels in run order. long_context holds, per tier, distinct prompts for every temperature
    (interleaved: prompt i serves temperature i % len(temperatures))."""
    levels: list[Level] = []
    limits = httpx.Limits(
        max_connections=max(config.concurrency) + 4, max_keepalive_connections=max(config.concurrency) + 4
    )
    timeout = httpx.Timeout(config.request_timeout, connect=30.0)
    metrics_url = f"{config.root_url}/metrics"
    sync_client = httpx.Client(headers=config.headers())  # /metrics, scraped from a worker thread
    async with httpx.AsyncClient(headers=config.headers(), timeout=timeout, limits=limits) as client:

        async def measure(
            kind: str, category: str, prompts: list[Prompt], concurrency: int, temperature: float
        ) -> None:
            before = await asyncio.to_thread(spec_metrics.scrape, sync_client, metrics_url)
            label = f"T={temperature:g} {category} c={concurrency}"
            count = len(prompts) if kind == "long_context" else None  # each padded prompt once
            results, wall = await run_level(client, config, prompts, concurrency, temperature, label, count)
            after = await asyncio.to_thread(spec_metrics.scrape, sync_client, metrics_url)
            summary = summarize_level([r.to_dict() for r in results], wall)
            levels.append(
                Level(
                    kind,
                    category,
                    concurrency,
                    temperature,
                    summary,
                    results,
                    spec_metrics.counter_delta(before, after),
                )
            )

        first = next(iter(workload.values()))
        for i in range(config.warmup):  # not recorded: first-request costs (allocations, caches, JIT)
            request = make_request(first[i % len(first)], config, config.temperatures[0], i)
            warm = RequestResult(request.category, request.temperature, 1, 0.0, 0.0)
            await send_request(
                client, config.endpoint, request_body(request, config.model, config.chat), config.chat, warm, 0.0
            )
        for t, temperature in enumerate(config.temperatures):
            for category, prompts in workload.items():
                for concurrency in config.concurrency:
                    await measure("category", category, prompts, concurrency, temperature)
            for tier, prompts in (long_context or {}).items():
                # Each temperature gets its own padded prompts: a prefix-cache hit is not a prefill.
                await measure("long_context", tier, prompts[t :: len(config.temperatures)], 1, temperature)
    sync_client.close()
    return levels
