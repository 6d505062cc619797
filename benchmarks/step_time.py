"""Engine step time on the embedded default model, robust to a noisy machine: the 10th-percentile
step of each run, best of --repeats runs, for plain decode at c=1 and c=32 and for speculative
steps (ngram k=4, a random-weight DFlash drafter of block 8, which verifies 1 + 7 rows per step).
Percentiles of many steps move far less with other load than whole-run tok/s, so two builds run
one after the other compare well.
Run:  python benchmarks/step_time.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from speculative import write_random_dflash_drafter

from fp4serve import LLM, SamplingParams


def step_times(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[float]:
    """Seconds of every step after the prompts' prefills, sorted."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return sorted(times[len(prompts) :])


def p10(llm: LLM, concurrency: int, repeats: int) -> float:
    prompts = [[1 + (i * 7 + j) % 1000 for j in range(32)] for i in range(concurrency)]
    return min(t[len(t) // 10] for t in (step_times(llm, prompts, 40) for _ in range(repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = LLM(None, dtype=args.dtype, max_num_seqs=32)
    rows = [(f"decode c={c}", p10(plain, c, args.repeats)) for c in (1, 32)]
    drafter = Path(tempfile.mkdtemp()) / "dflash"
    write_random_dflash_drafter(drafter, plain.engine.info.text_config, 2, 8)
    specs = {
        "ngram k=4 c=1": {"method": "ngram", "num_speculative_tokens": 4},
        "dflash block 8 c=1": {"method": "dflash", "model": str(drafter)},
    }
    for name, spec in specs.items():
        rows.append((name, p10(LLM(None, dtype=args.dtype, speculative_config=spec), 1, args.repeats)))
    print(f"\nmodel SmolLM2-135M-Instruct, {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'workload':22}{'step p10 ms':>12}")
    for name, seconds in rows:
        print(f"{name:22}{seconds * 1000:12.2f}")


if __name__ == "__main__":
    main()
