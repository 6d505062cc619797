"""Offline throughput of the engine on the embedded default model, with transformers as a peer.

Prints one table: decode tok/s at several concurrencies (steps where every sequence decodes),
and prefill tok/s on 512-token prompts. Each figure is the best of --repeats runs: shared cloud
CPUs swing by 20-40% from run to run, and the best run is the one least disturbed.
Run:  python benchmarks/offline_throughput.py
"""
from __future__ import annotations

import argparse
import time

import torch

from fp4serve import LLM, SamplingParams


def timed_run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, int, float, int]:
    """Drive the engine step by step; returns (decode seconds, decode tokens, prefill seconds,
    prefill tokens), a step counting as decode when every scheduled sequence computes one token."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    decode_s = prefill_s = 0.0
    decode_n = prefill_n = 0
    while engine.has_unfinished_requests():
        plan_tokens = [(len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens) for r in engine.scheduler.running]
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if engine.scheduler.waiting or any(n != 1 for n in plan_tokens) or len(plan_tokens) != len(prompts):
            prefill_s += elapsed
            prefill_n += 1
        else:
            decode_s += elapsed
            decode_n += len(plan_tokens)
    return decode_s, decode_n, prefill_s, prefill_n


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(n)]


def engine_rows(llm: LLM, concurrencies: list[int], decode_tokens: int, prefill_prompts: int, repeats: int):
    vocab = llm.engine.vocab_size
    rows = []
    timed_run(llm, random_prompts(2, 16, vocab, 0), 8)  # warm-up
    for c in concurrencies:
        rates = []
        for _ in range(repeats):
            decode_s, decode_n, _, _ = timed_run(llm, random_prompts(c, 16, vocab, c), decode_tokens)
            rates.append(decode_n / decode_s)
        rows.append(("fp4serve", f"decode c={c}", max(rates)))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(prefill_prompts, 512, vocab, 99)]
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1))
        rates.append(prefill_prompts * 512 / (time.perf_counter() - start))
    rows.append(("fp4serve", "prefill 512", max(rates)))
    return rows


def transformers_rows(path: str, concurrencies: list[int], decode_tokens: int, repeats: int) -> list[tuple]:
    """The same decode workload through transformers' generate (bf16, padded batch)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rows = []
    for c in concurrencies:
        ids = torch.tensor(random_prompts(c, 16, model.config.vocab_size, c))
        kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
        rates = []
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, **kwargs)
            for _ in range(repeats):
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=1, **kwargs)
                first = time.perf_counter() - start
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=decode_tokens, **kwargs)
                total = time.perf_counter() - start
                rates.append(c * (decode_tokens - 1) / (total - first))
        rows.append(("transformers", f"decode c={c}", max(rates)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill-prompts", type=int, default=8)
    parser.add_argument("--peer", choices=["transformers", "none"], default="transformers")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(args.concurrency), enable_prefix_caching=False)
    rows = engine_rows(llm, args.concurrency, args.decode_tokens, args.prefill_prompts, args.repeats)
    if args.peer == "transformers":
        rows += transformers_rows(str(llm.engine.model_path), args.concurrency, args.decode_tokens, args.repeats)
    print(f"\nmodel {llm.engine.model_path.name}, {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'engine':<14}{'workload':<16}{'tok/s':>10}")
    for engine, workload, rate in rows:
        print(f"{engine:<14}{workload:<16}{rate:>10.1f}")


if __name__ == "__main__":
    main()
