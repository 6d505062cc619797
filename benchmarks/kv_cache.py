"""KV cache dtypes on the embedded default model: capacity and decode speed per --kv-cache-dtype.

Prints one table: for auto (the model dtype), fp8 and nvfp4 at the same --kv-cache-memory, the
KV capacity in tokens (and the gain over auto), and decode tok/s at each concurrency (steps where
every sequence decodes; 16-token prompts). Each speed is the best of --repeats runs (shared CPUs
swing 20-40% between runs). On a machine shared with other jobs, `--threads 1 --clock cpu` times
decode steps by this process's CPU time, which other jobs disturb far less than wall time.
Run:  python benchmarks/kv_cache.py
"""
from __future__ import annotations

import argparse
import time

import torch
from offline_throughput import random_prompts

from fp4serve import LLM, SamplingParams


def decode_rate(llm: LLM, prompts: list[list[int]], max_tokens: int, clock) -> float:
    """Tokens per second over the steps where every sequence decodes one token."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    seconds, tokens = 0.0, 0
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        decoding = not engine.scheduler.waiting and len(running) == len(prompts) and all(
            len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens == 1 for r in running
        )  # fmt: skip
        start = clock()
        engine.step()
        if decoding:
            seconds += clock() - start
            tokens += len(prompts)
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto", "fp8", "nvfp4"])
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for kv_dtype in args.kv_cache_dtype:
        llm = LLM(
            args.model, dtype=args.dtype, kv_cache_dtype=kv_dtype, kv_cache_memory=args.kv_cache_memory,
            max_num_seqs=max(args.concurrency), enable_prefix_caching=False,
        )  # fmt: skip
        capacity = llm.engine.capacity
        vocab = llm.engine.vocab_size
        decode_rate(llm, random_prompts(2, 16, vocab, 0), 8, clock)  # warm-up
        rates = []
        for c in args.concurrency:
            prompts = random_prompts(c, 16, vocab, c)
            rates.append(max(decode_rate(llm, prompts, args.decode_tokens, clock) for _ in range(args.repeats)))
        rows.append((kv_dtype, capacity.kv_format.name, capacity.kv_bytes_per_token, capacity.num_tokens, capacity.gain, rates))
        del llm
    print(f"\nmodel {args.model or 'SmolLM2-135M-Instruct'}, {args.dtype}, --kv-cache-memory {args.kv_cache_memory}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}")  # fmt: skip
    speed_cols = "".join(f"{f'decode c={c}':>14}" for c in args.concurrency)
    print(f"{'--kv-cache-dtype':<18}{'storage':<10}{'B/token':>9}{'tokens':>11}{'gain':>7}{speed_cols}")
    for kv_dtype, storage, per_token, tokens, gain, rates in rows:
        speeds = "".join(f"{r:>14.1f}" for r in rates)
        print(f"{kv_dtype:<18}{storage:<10}{per_token:>9}{tokens:>11}{gain:>6.2f}x{speeds}")


if __name__ == "__main__":
    main()
