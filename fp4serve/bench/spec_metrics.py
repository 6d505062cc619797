"""Draft acceptance from a server's Prometheus /metrics, with vLLM's counter names.

Counters are scraped before and after a level; the difference is that level's drafting. A counter
the server does not export is None ("not reported"), never 0: a server without speculative decoding
and one whose drafts are all rejected must not look the same.
"""

from __future__ import annotations

import re

import httpx

from fp4serve import metric_names as names

# Sample names as any vLLM-compatible server exposes them (vLLM included), keyed as in the results.
COUNTERS = {
    "num_drafts": names.exposed_counter(names.SPEC_DECODE_NUM_DRAFTS),
    "num_draft_tokens": names.exposed_counter(names.SPEC_DECODE_NUM_DRAFT_TOKENS),
    "num_accepted_tokens": names.exposed_counter(names.SPEC_DECODE_NUM_ACCEPTED_TOKENS),
}
PER_POSITION = names.exposed_counter(names.SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for each sample line of the Prometheus text exposition format."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
        except ValueError:
            continue
    return samples


def spec_counters(text: str) -> dict:
    """The speculative-decoding counters summed over label sets (engines, models); None when absent.
    accepted_per_pos maps position -> count."""
    samples = parse_samples(text)
    counters = {}
    for key, name in COUNTERS.items():
        values = [value for sample, _, value in samples if sample == name]
        counters[key] = sum(values) if values else None
    per_pos: dict[int, float] = {}
    for sample, labels, value in samples:
        if sample == PER_POSITION and "position" in labels:
            position = int(labels["position"])
            per_pos[position] = per_pos.get(position, 0.0) + value
    counters["accepted_per_pos"] = per_pos or None
    return counters


def scrape(client: httpx.Client | None, metrics_url: str) -> dict | None:
    """The counters at `metrics_url`, or None when the server has no /metrics."""
    try:
        response = (client or httpx).get(metrics_url, timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return spec_counters(response.text)


def counter_delta(before: dict | None, after: dict | None) -> dict:
    """after - before per counter; None where either side did not report it."""
    before = before or {}
    after = after or {}
    delta = {}
    for key in COUNTERS:
        b, a = before.get(key), after.get(key)
        delta[key] = a - b if a is not None and b is not None else None
    b_pos, a_pos = before.get("accepted_per_pos"), after.get("accepted_per_pos")
    if a_pos is not None and b_pos is not None:
        delta["accepted_per_pos"] = {p: a_pos[p] - b_pos.get(p, 0.0) for p in sorted(a_pos)}
    else:
        delta["accepted_per_pos"] = None
    return delta


def acceptance(delta: dict) -> dict:
    """vLLM's meanings (docs/reference.md section 7): rate = accepted / draft tokens, mean acceptance
    length = 1 + accepted / drafts, per position = accepted at i / drafts. `status` says which:
    "not reported" (no counters), "no drafts" (counters, but nothing drafted), or "ok"."""
    drafts, draft_tokens, accepted = (delta.get(k) for k in COUNTERS)
    if drafts is None or draft_tokens is None or accepted is None:
        return {"status": "not reported", "acceptance_rate": None, "mean_acceptance_length": None, "per_position": None}
    if drafts == 0 or draft_tokens == 0:
        return {"status": "no drafts", "acceptance_rate": None, "mean_acceptance_length": None, "per_position": None}
    per_pos = delta.get("accepted_per_pos")
    per_position = [per_pos[p] / drafts for p in sorted(per_pos)] if per_pos else None
    return {
        "status": "ok",
        "acceptance_rate": accepted / draft_tokens,
        "mean_acceptance_length": 1.0 + accepted / drafts,
        "per_position": per_position,
    }
