"""Counting prompt tokens for padding long-context and random prompts to a requested length.

In order of trust: the server's own /tokenize (vLLM's or llama.cpp's shape), a local tokenizer
(--tokenizer, or the directory /v1/models names as the model's root when it exists here), else an
estimate of 4 characters per token. `method` says which one counted, and the report repeats it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class TokenCounter:
    def __init__(self, count: Callable[[str], int], method: str):
        self.count = count
        self.method = method


def estimate_counter() -> TokenCounter:
    return TokenCounter(lambda text: max(1, round(len(text) / 4)), "estimate (4 characters per token)")


def _server_counter(client: httpx.Client, root_url: str, model: str) -> TokenCounter | None:
    """vLLM: POST /tokenize {"model", "prompt"} -> {"count"}; llama.cpp: {"content"} -> {"tokens"}."""
    shapes = [({"model": model, "prompt": "{}", "add_special_tokens": False}, "vLLM"), ({"content": "{}"}, "llama.cpp")]
    for template, flavour in shapes:

        def count(text: str, template=template) -> int:
            body = {k: (text if v == "{}" else v) for k, v in template.items()}
            response = client.post(f"{root_url}/tokenize", json=body, timeout=60)
            response.raise_for_status()
            data = response.json()
            return data["count"] if "count" in data else len(data["tokens"])

        try:
            if count("hello world") > 0:
                return TokenCounter(count, f"server /tokenize ({flavour} shape)")
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            continue
    return None


def local_counter(path: str | Path) -> TokenCounter:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return TokenCounter(
        lambda text: len(tokenizer(text, add_special_tokens=False).input_ids), f"local tokenizer ({path})"
    )


def make_counter(
    client: httpx.Client, root_url: str, model: str, tokenizer: str | None, model_root: str | None
) -> TokenCounter:
    """The most trustworthy counter available (see the module docstring)."""
    counter = _server_counter(client, root_url, model)
    if counter:
        return counter
    for path in (tokenizer, model_root):
        if path and Path(path).is_dir() and (Path(path) / "tokenizer_config.json").exists():
            try:
                return local_counter(path)
            except (OSError, ValueError) as e:
                log.warning("cannot load the tokenizer in %s (%s)", path, e)
    return estimate_counter()


def fit_to_tokens(
    counter: TokenCounter, make_text: Callable[[int], str], target: int, tolerance: float = 0.02
) -> tuple[str, int]:
    """make_text(n_chars) -> text of about n_chars; rescale n_chars by the measured characters per
    token until the count is within tolerance of target. Returns (text, counted tokens)."""
    chars = target * 4
    best = None
    for _ in range(8):
        text = make_text(chars)
        tokens = counter.count(text)
        if best is None or abs(tokens - target) < abs(best[1] - target):
            best = (text, tokens)
        if abs(tokens - target) <= max(tolerance * target, 2):
            break
        chars = max(1, round(chars * target / max(tokens, 1)))
    return best
