"""A soak: minutes of agent-like traffic against one OpenAI-compatible server, then the checks that
catch slow decay and leaks rather than single failures.

Traffic: `concurrency` clients, each running multi-turn chat conversations back to back. A
conversation opens with one of a few shared system prompts (so prefixes repeat across clients),
sends 2 to `max_turns` user turns of mixed length, and carries every reply into the next turn (so
turn k+1 extends turn k, which prefix caching should reuse). Some turns are aborted mid-stream,
some are non-streaming with a client that gives up early (a disconnect), half run at T=0.

It reports: requests, errors (anything but the aborts and disconnects it caused on purpose), 5xx,
per window the prefix-cache hit rate and draft acceptance rate (from /metrics), the server's KV
cache use after the load has drained (which must be back to idle), its peak RSS when its process is
known, and a sample of T=0 turns replayed one at a time, whose replies must equal the ones given
under load.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fp4serve import metric_names as names
from fp4serve.bench.spec_metrics import parse_samples
from fp4serve.bench.workloads import CATEGORIES, category_prompts, document_paragraphs

COUNTER_KEYS = {
    "hits": names.exposed_counter(names.PREFIX_CACHE_HITS),
    "queries": names.exposed_counter(names.PREFIX_CACHE_QUERIES),
    "draft_tokens": names.exposed_counter(names.SPEC_DECODE_NUM_DRAFT_TOKENS),
    "accepted": names.exposed_counter(names.SPEC_DECODE_NUM_ACCEPTED_TOKENS),
}
GAUGE_KEYS = {
    "running": names.NUM_REQUESTS_RUNNING,
    "waiting": names.NUM_REQUESTS_WAITING,
    "kv_usage": names.KV_CACHE_USAGE,
}


@dataclass
class SoakConfig:
    duration_s: float = 600.0
    concurrency: int = 64
    window_s: float = 60.0  # metrics are differenced over windows of this length
    max_turns: int = 5
    abort_fraction: float = 0.05  # streamed turns closed after a few chunks
    disconnect_fraction: float = 0.03  # non-streaming turns whose client gives up after 0.2-1 s
    greedy_fraction: float = 0.5  # turns at temperature 0 (the others at 0.8)
    replay_samples: int = 16  # T=0 turns replayed alone after the load: the first that finished
    drain_timeout_s: float = 120.0
    seed: int = 0


@dataclass
class Window:
    end_s: float
    requests: int
    hit_rate: float | None  # prefix-cache hit tokens / queried tokens in the window; None: no queries
    acceptance_rate: float | None  # accepted / draft tokens in the window; None: nothing drafted or not exported


@dataclass
class SoakReport:
    requests: int = 0
    aborts: int = 0  # turns closed on purpose
    disconnects: int = 0  # turns whose client gave up on purpose before the reply
    errors: list[str] = field(default_factory=list)
    server_errors: int = 0  # 5xx responses, and error events inside streams
    windows: list[Window] = field(default_factory=list)
    idle: dict[str, float | None] = field(default_factory=dict)  # gauges once drained
    drained_s: float | None = None  # load end to idle; None: not idle within drain_timeout_s
    peak_rss_bytes: int | None = None
    replayed: int = 0
    replay_mismatches: list[dict] = field(default_factory=list)

    @property
    def leaked(self) -> bool:
        return self.drained_s is None or bool(self.idle.get("kv_usage"))


@dataclass
class _Turn:
    messages: list[dict]
    max_tokens: int
    reply: str


class _Traffic:
    def __init__(self, config: SoakConfig):
        self.config = config
        paragraphs = document_paragraphs()
        # A few long shared system prompts: the prefixes every conversation starts with.
        self.systems = [
            "You are a careful assistant. Background notes follow; answer from them when they apply.\n\n"
            + "\n\n".join(paragraphs[i : i + 3 + 2 * i])
            for i in range(4)
        ]
        self.questions = [p.text for prompts in category_prompts(list(CATEGORIES)).values() for p in prompts]
        self.paragraphs = paragraphs

    def user_message(self, rng: random.Random) -> str:
        question = rng.choice(self.questions)
        if rng.random() < 0.25:  # a long turn: pasted context before the question
            return rng.choice(self.paragraphs) + "\n\n" + question
        return question


async def run_soak(base_url: str, model: str | None, config: SoakConfig, server_pid: int | None = None) -> SoakReport:
    """The soak against `base_url` (…/v1); `model`: the served name (None: the server's default);
    `server_pid`: the server process, for its peak RSS."""
    report = SoakReport()
    model = {"model": model} if model else {}
    traffic = _Traffic(config)
    replays: list[_Turn] = []
    metrics_url = base_url.removesuffix("/v1") + "/metrics"
    limits = httpx.Limits(max_connections=config.concurrency + 4, max_keepalive_connections=config.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.monotonic()
        deadline = start + config.duration_s
        finished_in_window = [0]

        async def one_client(index: int) -> None:
            rng = random.Random(config.seed * 1_000_003 + index)
            while time.monotonic() < deadline:
                await _conversation(
                    client, base_url, model, traffic, rng, deadline, report, replays, finished_in_window
                )

        windows = asyncio.create_task(
            _watch_windows(client, metrics_url, config, start, deadline, report, finished_in_window)
        )
        await asyncio.gather(*(one_client(i) for i in range(config.concurrency)))
        load_end = time.monotonic()
        await windows
        report.idle, drained = await _wait_idle(client, metrics_url, config.drain_timeout_s)
        report.drained_s = time.monotonic() - load_end if drained else None
        report.peak_rss_bytes = peak_rss(server_pid) if server_pid else None
        await _replay(client, base_url, model, replays[: config.replay_samples], report)
    return report


async def _conversation(client, base_url, model, traffic, rng, deadline, report, replays, finished) -> None:
    config = traffic.config
    messages = [{"role": "system", "content": rng.choice(traffic.systems)}]
    for _ in range(rng.randint(2, config.max_turns)):
        if time.monotonic() >= deadline:
            return
        messages.append({"role": "user", "content": traffic.user_message(rng)})
        greedy = rng.random() < config.greedy_fraction
        body = {"messages": messages, "max_tokens": rng.choice([16, 32, 64, 128]),
                "temperature": 0.0 if greedy else 0.8, "seed": rng.randrange(2**31)} | model  # fmt: skip
        draw = rng.random()
        report.requests += 1
        if draw < config.abort_fraction:
            await _stream(client, base_url, body, report, close_after=rng.randint(1, 4))
            report.aborts += 1
            return  # the conversation ends with the turn its user cut off
        if draw < config.abort_fraction + config.disconnect_fraction:
            await _give_up(client, base_url, body, report, after_s=rng.uniform(0.2, 1.0))
            report.disconnects += 1
            return
        reply = await _stream(client, base_url, body, report)
        finished[0] += 1
        if reply is None:
            return
        if greedy and len(replays) < config.replay_samples:  # the first ones that finish
            replays.append(_Turn([dict(m) for m in messages], body["max_tokens"], reply))
        messages.append({"role": "assistant", "content": reply})


async def _stream(client, base_url, body, report, close_after: int | None = None) -> str | None:
    """The reply text of one streamed turn, or None when it failed (recorded) or was closed on purpose."""
    pieces, chunks = [], 0
    try:
        async with client.stream("POST", f"{base_url}/chat/completions", json=body | {"stream": True}) as response:
            if response.status_code != 200:
                _record_status(report, response.status_code, (await response.aread()).decode(errors="replace"))
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("error"):
                    report.server_errors += 1
                    report.errors.append(f"stream error event: {event['error']}")
                    return None
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        pieces.append(text)
                        chunks += 1
                if close_after is not None and chunks >= close_after:
                    return None  # leaving the block closes the connection: the server must abort
    except httpx.HTTPError as e:
        report.errors.append(f"{type(e).__name__}: {e}")
        return None
    return "".join(pieces)


async def _give_up(client, base_url, body, report, after_s: float) -> None:
    """A non-streaming turn whose client hangs up after `after_s` unless answered first."""
    try:
        response = await client.post(f"{base_url}/chat/completions", json=body, timeout=after_s)
        if response.status_code != 200:
            _record_status(report, response.status_code, response.text)
    except httpx.TimeoutException:
        pass  # the disconnect this turn was for
    except httpx.HTTPError as e:
        report.errors.append(f"{type(e).__name__}: {e}")


def _record_status(report: SoakReport, status: int, body: str) -> None:
    if status >= 500:
        report.server_errors += 1
    report.errors.append(f"HTTP {status}: {body[:200]}")


async def _scrape(client: httpx.AsyncClient, metrics_url: str) -> dict[str, float]:
    response = await client.get(metrics_url, timeout=30)
    response.raise_for_status()
    wanted = {name: key for key, name in (COUNTER_KEYS | GAUGE_KEYS).items()}
    values: dict[str, float] = {}
    for name, _, value in parse_samples(response.text):
        if name in wanted:
            values[wanted[name]] = values.get(wanted[name], 0.0) + value
    return values


async def _watch_windows(client, metrics_url, config, start, deadline, report, finished) -> None:
    previous = await _scrape(client, metrics_url)
    while True:
        now = time.monotonic()
        await asyncio.sleep(max(0.0, min(config.window_s, deadline - now)))
        current = await _scrape(client, metrics_url)
        delta = {key: current.get(key, 0.0) - previous.get(key, 0.0) for key in COUNTER_KEYS}
        report.windows.append(
            Window(
                end_s=time.monotonic() - start,
                requests=finished[0],
                hit_rate=delta["hits"] / delta["queries"] if delta["queries"] else None,
                acceptance_rate=delta["accepted"] / delta["draft_tokens"] if delta["draft_tokens"] else None,
            )
        )
        finished[0] = 0
        previous = current
        if time.monotonic() >= deadline:
            return


async def _wait_idle(client, metrics_url, timeout_s: float) -> tuple[dict, bool]:
    """The gauges once nothing runs or waits (and the KV cache is unused), or at the timeout."""
    end = time.monotonic() + timeout_s
    while True:
        values = await _scrape(client, metrics_url)
        idle = not values.get("running") and not values.get("waiting") and not values.get("kv_usage")
        if idle or time.monotonic() > end:
            gauges = {k: v for k, v in values.items() if k in GAUGE_KEYS}
            return gauges, idle
        await asyncio.sleep(0.5)


async def _replay(client, base_url, model, turns: list[_Turn], report: SoakReport) -> None:
    """Each sampled T=0 turn again, alone: the same reply as under load, or a recorded mismatch."""
    for turn in turns:
        body = {"messages": turn.messages, "max_tokens": turn.max_tokens, "temperature": 0.0} | model
        response = await client.post(f"{base_url}/chat/completions", json=body)
        report.replayed += 1
        alone = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
        if alone != turn.reply:
            report.replay_mismatches.append({"under_load": turn.reply, "alone": alone})


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set (VmHWM), in bytes; None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def format_report(report: SoakReport, title: str) -> str:
    """The Markdown tables docs/benchmarks.md records."""

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    rss = f"{report.peak_rss_bytes / 2**20:.0f} MiB" if report.peak_rss_bytes else "not known"
    idle = ", ".join(f"{k} {v:g}" for k, v in sorted(report.idle.items())) or "no gauges"
    drained = "not idle" if report.drained_s is None else f"{report.drained_s:.1f} s"
    lines = [
        f"### {title}",
        "",
        "| requests | aborted | disconnected | errors | 5xx | drained after | idle gauges | peak RSS | T=0 replays identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {report.requests} | {report.aborts} | {report.disconnects} | {len(report.errors)} | {report.server_errors} "
        f"| {drained} | {idle} | {rss} | {report.replayed - len(report.replay_mismatches)}/{report.replayed} |",
        "",
        "| window end (s) | turns finished | prefix-cache hit rate | draft acceptance rate |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {w.end_s:.0f} | {w.requests} | {rate(w.hit_rate)} | {rate(w.acceptance_rate)} |" for w in report.windows
    ]
    for error in report.errors[:10]:
        lines.append(f"\nerror: {error}")
    return "\n".join(lines)
