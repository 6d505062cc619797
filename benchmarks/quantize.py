"""Time, peak RSS and quality of `fp4serve quantize` algorithms on one model (default: the embedded
SmolLM2-135M-Instruct), each in its own process so peak RSS is that run's.

    python benchmarks/quantize.py [--model DIR] [--algorithms max awq-lite awq-full] [--num-samples 8]

Prints one row per algorithm: quantize seconds, peak RSS, output size, and `fp4serve eval`'s
KL(base || quant), top-1 agreement, perplexities and last-layer hidden error on the bundled text."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "fp4serve.cli", *args], check=False, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fp4serve {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    from fp4serve.default_model import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--algorithms", nargs="+", default=["max", "awq-lite", "awq-full"])
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--format", default="compressed-tensors")
    args = p.parse_args()
    model = args.model or str(default_model_path())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in args.algorithms:
            out = Path(tmp) / algorithm
            start = time.perf_counter()
            report = run(["quantize", model, str(out), "--algorithm", algorithm, "--format", args.format,
                          "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--no-progress",
                          "--log-level", "WARNING"])  # fmt: skip
            seconds = time.perf_counter() - start
            peak = re.search(r"peak RSS (\d+) MiB", report).group(1)
            size = re.search(r"output size ([\d.]+) MiB", report).group(1)
            figures = json.loads(run(["eval", str(out), "--base", model, "--json", "--log-level", "WARNING"]))
            rows.append((algorithm, seconds, peak, size, figures))
    print(f"{model}: {args.num_samples} calibration samples x {args.seq_len} tokens, format {args.format}")
    print(
        "| algorithm | quantize s | peak RSS MiB | output MiB | KL mean | top-1 | ppl base | ppl quant | hidden err |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for algorithm, seconds, peak, size, f in rows:
        print(f"| {algorithm} | {seconds:.1f} | {peak} | {size} | {f['kl_mean']:.4f} | {100 * f['top1_agreement']:.1f}% "
              f"| {f['ppl_base']:.2f} | {f['ppl_quant']:.2f} | {f['final_hidden_error']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
