"""Prefix caching on a hybrid (GDN + attention) Qwen3.5 model: what a multi-turn conversation
computes per turn, and what GDN snapshots cost when nothing is reused.

1. A 5-turn conversation (a 400-token system prompt, 120-token user turns, 32-token replies, each
   turn's prompt = the previous prompt + its reply + the new user turn), with prefix caching off and
   on, without drafting and with MTP and DFlash drafting: per turn the prompt length, the tokens
   served from the cache and the share of the prompt they are.
2. Throughput on distinct prompts (no reuse at all), prefix caching off vs on: what taking GDN
   snapshots (docs/prefix_caching.md) and hashing blocks costs. Best of --repeats.

The model is benchmarks/tiny_hybrid.py's small random Qwen3.5 (with an MTP head) and its DFlash
drafter, in float32 on CPU.
Run:  python benchmarks/hybrid_prefix.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent)]

from tiny_hybrid import build_tiny_hybrid  # noqa: E402

from fp4serve import LLM, SamplingParams  # noqa: E402
from fp4serve.kernels.cpu_features import cpu_features  # noqa: E402

ENGINE = {"dtype": "float32", "max_model_len": 4096, "kv_cache_memory": "256MiB", "max_num_batched_tokens": 512}


def conversation_turns(llm: LLM, rng: random.Random, turns: int = 5) -> list[tuple[int, int]]:
    """(prompt tokens, tokens served by the prefix cache) for each turn of one conversation."""
    prompt = [rng.randrange(3, 500) for _ in range(400)]
    rows = []
    for _ in range(turns):
        prompt = prompt + [rng.randrange(3, 500) for _ in range(120)]
        [out] = llm.generate(
            [{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        )
        rows.append((len(prompt), out.num_cached_tokens))
        prompt = prompt + list(out.outputs[0].token_ids)
    return rows


def no_reuse_tok_s(llm: LLM, repeats: int) -> float:
    """Output tokens per second on 16 distinct 600-token prompts at once, best of `repeats`."""
    best = 0.0
    for r in range(repeats):
        rng = random.Random(1000 + r)  # new prompts every round: no hit from the round before
        prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(600)]} for _ in range(16)]
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        seconds = time.perf_counter() - start
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpu = cpu_features()
    print(f"CPU level {cpu.level}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        target, drafter = build_tiny_hybrid(Path(tmp))
        dflash = {"method": "dflash", "model": str(drafter), "num_speculative_tokens": 3}
        drafting = {"none": None, "mtp": {"method": "mtp", "num_speculative_tokens": 3}, "dflash": dflash}
        print("\n| drafting | prefix caching | turn | prompt tokens | from cache | computed | cached share |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, spec in drafting.items():
            for caching in (False, True):
                llm = LLM(str(target), enable_prefix_caching=caching, speculative_config=spec, **ENGINE)
                for turn, (tokens, cached) in enumerate(conversation_turns(llm, random.Random(7)), start=1):
                    print(f"| {name} | {'on' if caching else 'off'} | {turn} | {tokens} | {cached} | "
                          f"{tokens - cached} | {100 * cached / tokens:.1f}% |")  # fmt: skip
                del llm
        print("\n| workload | prefix caching off (tok/s) | on (tok/s) | on / off |\n| --- | --- | --- | --- |")
        speeds = {}
        for caching in (False, True):
            llm = LLM(str(target), enable_prefix_caching=caching, **ENGINE)
            speeds[caching] = no_reuse_tok_s(llm, args.repeats)
            del llm
        print(f"| 16 distinct 600-token prompts, 64 tokens each | {speeds[False]:.1f} | {speeds[True]:.1f} | "
              f"{speeds[True] / speeds[False]:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
