"""Prompt sets: the bundled categories, random-token prompts of set lengths, users' JSONL files,
and long-context prompts padded with the bundled documents to a token count."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fp4serve.bench.token_count import TokenCounter, fit_to_tokens
from fp4serve.errors import BenchError

WORKLOAD_DIR = Path(__file__).parent / "workloads"
CATEGORIES = ("coding", "math", "reasoning", "prose", "natural_language", "extraction_json")
CATEGORY_TITLES = {
    "coding": "Coding",
    "math": "Math",
    "reasoning": "Reasoning",
    "prose": "Prose",
    "natural_language": "Natural language",
    "extraction_json": "Extraction / JSON",
}


@dataclass
class Prompt:
    category: str
    text: str
    max_tokens: int | None = None  # None: the run's --max-tokens
    ignore_eos: bool = False


def category_prompts(categories: list[str]) -> dict[str, list[Prompt]]:
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise BenchError(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    return {c: read_jsonl(WORKLOAD_DIR / f"{c}.jsonl", default_category=c)[c] for c in categories}


def read_jsonl(path: str | Path, default_category: str = "custom") -> dict[str, list[Prompt]]:
    """One JSON object a line: {"prompt": str, "category"?: str, "max_tokens"?: int}. Prompts are
    grouped by category in file order."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"workload file {path} does not exist")
    groups: dict[str, list[Prompt]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise BenchError(f"{path} line {number}: not JSON ({e})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise BenchError(f'{path} line {number}: expected an object with a non-empty string "prompt"')
        max_tokens = item.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise BenchError(f"{path} line {number}: max_tokens must be a positive integer")
        category = str(item.get("category") or default_category)
        groups.setdefault(category, []).append(Prompt(category, item["prompt"], max_tokens))
    if not groups:
        raise BenchError(f"workload file {path} has no prompts")
    return groups


def document_paragraphs() -> list[str]:
    paragraphs = []
    for path in sorted((WORKLOAD_DIR / "documents").glob("*.txt")):
        paragraphs += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return paragraphs


def _filler(rng: random.Random, paragraphs: list[str], n_chars: int) -> str:
    """About n_chars of whole paragraphs in a seeded order (reshuffled on each pass, so two prompts'
    padding differs and a prefix cache cannot share it), the last one cut at a word."""
    parts, size = [], 0
    while size < n_chars:
        order = paragraphs[:]
        rng.shuffle(order)
        for p in order:
            if size >= n_chars:
                break
            parts.append(p)
            size += len(p) + 2
    text = "\n\n".join(parts)
    return text[:n_chars].rsplit(" ", 1)[0] if len(text) > n_chars else text


def long_context_prompts(
    counter: TokenCounter, tier_tokens: int, questions: list[Prompt], count: int, seed: int
) -> list[tuple[Prompt, int]]:
    """`count` prompts of about tier_tokens tokens: bundled documents, then a question from the
    selected categories. Returns (prompt, tokens counted by `counter`)."""
    paragraphs = document_paragraphs()
    out = []
    for i in range(count):
        question = questions[i % len(questions)]
        tail = f"\n\nThe documents above are background reading. Now answer this: {question.text}"
        question_tokens = counter.count(tail)
        rng_seed = seed * 1000 + i
        text, tokens = fit_to_tokens(
            counter,
            lambda n, rng_seed=rng_seed: _filler(random.Random(rng_seed), paragraphs, n),
            max(1, tier_tokens - question_tokens),
        )
        out.append((Prompt(question.category, text + tail), tokens + question_tokens))
    return out


def random_prompts(
    counter: TokenCounter, count: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[Prompt]:
    """Like `vllm bench serve --dataset random`: input and output lengths drawn uniformly from
    [len * (1 - range_ratio), len * (1 + range_ratio)]; the text is random words from the bundled
    documents, fitted to the input length; outputs run to max_tokens with ignore_eos."""
    if input_len < 1 or output_len < 1 or not 0 <= range_ratio < 1:
        raise BenchError("random workload: input and output lengths must be >= 1 and range ratio within [0, 1)")
    rng = random.Random(seed)
    words = sorted({w for p in document_paragraphs() for w in p.split()})

    def bounds(n: int) -> tuple[int, int]:
        return max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio)))

    prompts = []
    for i in range(count):
        n_in, n_out = rng.randint(*bounds(input_len)), rng.randint(*bounds(output_len))
        stream = " ".join(rng.choice(words) for _ in range(n_in * 3 + 16))
        text, _ = fit_to_tokens(counter, lambda n, s=stream: s[:n].rsplit(" ", 1)[0] or s[:n], n_in)
        prompts.append(Prompt("random", text, max_tokens=n_out, ignore_eos=True))
    return prompts


def parse_token_count(text: str) -> int:
    """'16k' -> 16384, '512' -> 512 (k = 1024, as in context-length names)."""
    value = text.strip().lower()
    try:
        return int(float(value[:-1]) * 1024) if value.endswith("k") else int(value)
    except ValueError:
        raise BenchError(f"not a token count: {text!r} (use e.g. 512, 16k)") from None
