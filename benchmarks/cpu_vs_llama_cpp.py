"""fp4serve against llama.cpp on the same machine, same model (SmolLM2-135M-Instruct: fp4serve's
default model, converted from the Q4_1 GGUF that llama.cpp runs as it is), in one run.

Rounds alternate fp4serve and llama.cpp (--rounds); each figure is the best over rounds, since a
shared CPU swings by tens of percent from minute to minute and the best run is the least disturbed.
Prints the machine (CPU flags and level, measured read bandwidth, fp32 and bf16 GEMM peaks), the
c=1 NVFP4 GEMV bandwidth next to the read bandwidth, and one table with the ratios and targets:

  decode c=1, 4-bit weights   fp4serve --quantization nvfp4 (and with --nvfp4-lm-head) vs llama-bench tg128
  decode c=8 / c=32 aggregate fp4serve default dtype vs llama-batched-bench (npp 128, ntg 128) npl 8 / 32
  prefill 512 / 4096          one prompt, fp4serve default dtype vs llama-bench pp512 / pp4096
  n-gram c=1                  fp4serve (default dtype, ngram k=4) on the extraction prompts vs tg128

llama.cpp: its bin directory (--llama-bin or $LLAMA_BIN), built as docs/benchmarks.md shows.
Run:  python benchmarks/cpu_vs_llama_cpp.py --llama-bin "$B" [--rounds 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from offline_throughput import random_prompts, timed_run
from speculative import measure

from fp4serve import LLM, SamplingParams
from fp4serve.bench.workloads import category_prompts
from fp4serve.default_model import default_model_path, find_default_gguf
from fp4serve.formats.nvfp4 import quantize_nvfp4
from fp4serve.kernels import cpu_nvfp4
from fp4serve.kernels.cpu_features import cpu_features
from fp4serve.tokenizer import chat_prompt_ids

# SmolLM2-135M's Linear shapes (out, in) and how many of each a decode step reads.
LAYER_SHAPES = [((960, 576), 30), ((576, 576), 30), ((3072, 576), 30), ((576, 1536), 30)]


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> dict:
    a = torch.ones(256 * 2**20 // 4)
    read = a.numel() * 4 / best_seconds(a.sum, 5) / 1e9
    out = {"read_gbs": read}
    for dtype in (torch.float32, torch.bfloat16):
        m = torch.randn(2048, 2048).to(dtype)
        out[f"gemm_{dtype}".replace("torch.", "")] = 2 * 2048**3 / best_seconds(lambda: m @ m, 3) / 1e9
    return out


def gemv_bandwidth() -> float:
    """GB/s of packed weights + scales that the c=1 NVFP4 GEMV streams over one decode step's worth
    of SmolLM2 layers (120 matrices, 57 MB, more than the L3 cache), fp32 activations."""
    lib = cpu_nvfp4.kernel()
    weights = [quantize_nvfp4(torch.randn(shape) * 0.02) for shape, count in LAYER_SHAPES for _ in range(count)]
    nbytes = sum(w.packed.numel() + w.block_scale.numel() for w in weights)
    xs = {k: torch.randn(1, k) for k in {w.packed.shape[1] * 2 for w in weights}}

    def step():
        for w in weights:
            cpu_nvfp4._gemv(lib, xs[w.packed.shape[1] * 2], w.packed, w.block_scale, w.global_scale.reshape(1), False)

    return nbytes / best_seconds(step, 5) / 1e9


def decode_rate(llm: LLM, concurrency: int, tokens: int, repeats: int) -> float:
    vocab = llm.engine.vocab_size
    rates = []
    for r in range(repeats):
        seconds, count, _, _ = timed_run(llm, random_prompts(concurrency, 128 if concurrency > 1 else 16, vocab, r), tokens)
        rates.append(count / seconds)
    return max(rates)


def prefill_rate(llm: LLM, length: int, repeats: int) -> float:
    prompt = {"prompt_token_ids": random_prompts(1, length, llm.engine.vocab_size, length)[0]}
    params = SamplingParams(temperature=0.0, max_tokens=1)
    return length / best_seconds(lambda: llm.generate(prompt, params), repeats)


def fp4serve_round(args) -> dict:
    out = {}
    common = dict(max_num_seqs=32, enable_prefix_caching=False, max_model_len=4608, kv_cache_memory="1GiB")
    for key, extra in (("c1_nvfp4", {}), ("c1_nvfp4_head", {"nvfp4_lm_head": True})):
        llm = LLM(quantization="nvfp4", **common, **extra)
        out[key] = decode_rate(llm, 1, 128, args.repeats)
        del llm
    llm = LLM(**common)
    out["dtype"] = str(llm.engine.dtype).removeprefix("torch.")
    out["c1_default"] = decode_rate(llm, 1, 128, args.repeats)
    out["c8"] = decode_rate(llm, 8, 128, args.repeats)
    out["c32"] = decode_rate(llm, 32, 128, max(1, args.repeats - 1))
    out["pp512"] = prefill_rate(llm, 512, args.repeats)
    out["pp4096"] = prefill_rate(llm, 4096, max(1, args.repeats - 1))
    del llm
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 5, "prompt_lookup_min": 2}
    for key, extra in (("ngram_c1", {}), ("ngram_c1_nvfp4", {"quantization": "nvfp4", "nvfp4_lm_head": True})):
        spec = LLM(**common, **extra, speculative_config=ngram)
        prompts = [chat_prompt_ids(spec.get_tokenizer(), [{"role": "user", "content": p.text}])
                   for p in category_prompts(["extraction_json"])["extraction_json"][:4]]  # fmt: skip
        out[key], out[f"{key}_accept_len"], _ = measure(spec, prompts, 128, max(1, args.repeats - 1))
        del spec
    return out


def run_json_lines(command: list[str]) -> list[dict]:
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def llama_round(args, gguf: Path) -> dict:
    bin_dir = Path(args.llama_bin)
    threads = str(args.threads)
    bench = run_json_lines([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", threads, "-p", "512,4096", "-n", "128",
                            "-r", str(args.repeats), "-o", "jsonl"])  # fmt: skip
    out = {}
    for row in bench:
        key = f"tg{row['n_gen']}" if row["n_gen"] else f"pp{row['n_prompt']}"
        out[key] = row["avg_ts"]
    batched = run_json_lines([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", threads, "-c", "8192",
                              "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "128", "-npl", "8,32",
                              "--output-format", "jsonl"])  # fmt: skip
    for row in batched:
        out[f"npl{row['pl']}"] = row["speed_tg"]
    return out


def merge_best(best: dict, new: dict) -> dict:
    return {k: max(best.get(k, v), v) if isinstance(v, float) else v for k, v in new.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bin", default=os.environ.get("LLAMA_BIN"), help="llama.cpp bin directory")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.llama_bin:
        parser.error("--llama-bin (or LLAMA_BIN): llama.cpp's bin directory (docs/benchmarks.md shows how to build it)")
    torch.set_num_threads(args.threads)
    default_model_path()  # converted once, before anything is timed
    gguf = find_default_gguf()
    ours: dict = {}
    peer: dict = {}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: fp4serve ...", flush=True)
        ours = merge_best(ours, fp4serve_round(args))
        print(f"  {ours}", flush=True)
        print(f"round {r + 1}/{args.rounds}: llama.cpp ...", flush=True)
        peer = merge_best(peer, llama_round(args, gguf))
        print(f"  {peer}", flush=True)
    hw = machine()
    gemv = gemv_bandwidth()
    print(f"\n{cpu_features().describe()}; {args.threads} threads; torch {torch.__version__}")
    print(f"read bandwidth {hw['read_gbs']:.1f} GB/s; GEMM 2048^3 fp32 {hw['gemm_float32']:.0f} GFLOP/s, "
          f"bf16 {hw['gemm_bfloat16']:.0f} GFLOP/s")  # fmt: skip
    print(f"NVFP4 c=1 GEMV over one step's SmolLM2 layers: {gemv:.1f} GB/s = {gemv / hw['read_gbs']:.0%} of read bandwidth")
    dtype = ours["dtype"]
    rows = [
        ("decode c=1, nvfp4 (lm_head 16-bit)", ours["c1_nvfp4"], peer["tg128"], "tg128", 1.2),
        ("decode c=1, nvfp4 + --nvfp4-lm-head", ours["c1_nvfp4_head"], peer["tg128"], "tg128", 1.2),
        (f"decode c=1, {dtype}", ours["c1_default"], peer["tg128"], "tg128", None),
        (f"decode c=8 aggregate, {dtype}", ours["c8"], peer["npl8"], "batched npl 8", None),
        (f"decode c=32 aggregate, {dtype}", ours["c32"], peer["npl32"], "batched npl 32", 3.0),
        (f"prefill 512, {dtype}", ours["pp512"], peer["pp512"], "pp512", 2.0),
        (f"prefill 4096, {dtype}", ours["pp4096"], peer["pp4096"], "pp4096", 2.0),
        (f"n-gram c=1 extraction, {dtype} (accept len {ours['ngram_c1_accept_len']:.2f})", ours["ngram_c1"], peer["tg128"],
         "tg128", 2.5),
        (f"n-gram c=1 extraction, nvfp4 + head (accept len {ours['ngram_c1_nvfp4_accept_len']:.2f})", ours["ngram_c1_nvfp4"],
         peer["tg128"], "tg128", 2.5),
    ]  # fmt: skip
    print("\n| workload | fp4serve tok/s | llama.cpp Q4_1 tok/s | ratio | target |\n| --- | ---: | ---: | ---: | ---: |")
    for name, a, b, peer_name, target in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} ({peer_name}) | {a / b:.2f}x | {f'>= {target}x' if target else '-'} |")


if __name__ == "__main__":
    main()
