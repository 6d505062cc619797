"""`fp4serve bench offline`: raw engine throughput without HTTP, like nano-vllm's bench.py: N
requests of random token ids with random input and output lengths (ignore_eos, so every request
generates exactly its length), all submitted at once, one timed `generate`."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from fp4serve.errors import BenchError


def parse_range(text: str) -> tuple[int, int]:
    """'16:256' -> (16, 256); '128' -> (128, 128)."""
    try:
        low, _, high = text.partition(":")
        bounds = (int(low), int(high or low))
    except ValueError:
        raise BenchError(f"not a length or range: {text!r} (use e.g. 128 or 16:256)") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise BenchError(f"length range {text!r} must satisfy 1 <= min <= max")
    return bounds


def run_offline(
    llm, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], temperature: float, seed: int
) -> dict:
    from fp4serve.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = llm.engine.vocab_size
    prompts = [
        {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(rng.randint(*input_len))]}
        for _ in range(num_prompts)
    ]
    params = [
        SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=rng.randint(*output_len), seed=seed + i)
        for i in range(num_prompts)
    ]
    llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    input_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "requests": num_prompts,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "requested_output_tokens": sum(p.max_tokens for p in params),
        "seconds": elapsed,
        "output_tok_s": output_tokens / elapsed,
        "total_tok_s": (input_tokens + output_tokens) / elapsed,
        "request_throughput": num_prompts / elapsed,
    }


def print_table(result: dict, model: str) -> None:
    print(f"\nfp4serve bench offline, model {model}")
    rows = [
        ("requests", f"{result['requests']}"),
        ("input tokens", f"{result['input_tokens']}"),
        ("output tokens", f"{result['output_tokens']}"),
        ("time", f"{result['seconds']:.2f} s"),
        ("output tok/s", f"{result['output_tok_s']:.1f}"),
        ("total tok/s (in + out)", f"{result['total_tok_s']:.1f}"),
        ("requests/s", f"{result['request_throughput']:.2f}"),
    ]
    for name, value in rows:
        print(f"{name:<24}{value:>14}")


def write_result(result: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline.json").write_text(json.dumps({"meta": meta, "result": result}, indent=1))
