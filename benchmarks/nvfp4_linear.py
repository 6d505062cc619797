"""W4A16 NVFP4 linear on CPU: the kernel (fp4serve/kernels/cpu_nvfp4.py) against a bf16 dense
matmul and against the reference (dequantize the whole matrix, then matmul).

Shapes (out x in): SmolLM2-135M's fused q/k/v 960x576, o 576x576, fused gate/up 3072x576,
down 576x1536, and a larger 5632x2048; x rows 1, 8, 32, 512 in bf16.

Two cache conditions, both printed:
- hot: one weight matrix called again and again, so it sits in cache (a micro-benchmark's view);
- cold: each call takes the next of several copies of the weights, together larger than the L3
  cache, as in a forward pass over a whole model, where every layer's weights come from memory.

Columns: microseconds per call, the best of --samples short bursts (shared CPUs are noisy: the
best burst is the least disturbed), for the bf16 matmul as F.linear computes it and with the
weight pre-packed for oneDNN (what fp4serve's bf16 engine runs), the reference, and the kernel;
then the kernel's time over the faster bf16 column (below 1: the 4-bit kernel is faster).
On a machine shared with other busy processes, two-thread wall-clock figures are dominated by
thread-scheduling stalls; `--threads 1 --clock cpu` then measures the work itself.
Run:  python benchmarks/nvfp4_linear.py [--threads 2] [--samples 20] [--torch-path] [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fp4serve.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from fp4serve.kernels import cpu_nvfp4

SHAPES = {
    "qkv 960x576": (960, 576),
    "o 576x576": (576, 576),
    "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "5632x2048": (5632, 2048),
}
ROWS = (1, 8, 32, 512)
COLD_BYTES = 96 * 2**20  # well past the 32 MB L3 of the machine measured in docs/benchmarks.md


def best_time_us(fn, copies: int, samples: int, calls: int, clock=time.perf_counter) -> float:
    """Best over `samples` short bursts of the mean time per call. Calls cycle through the weight
    copies across bursts, so in the cold condition no call finds its weights in cache. Short
    bursts and the minimum make the figure robust to other processes on a shared machine."""
    turn = 0
    for _ in range(2 * copies):  # warm-up: touch every copy
        fn(turn % copies)
        turn += 1
    best = float("inf")
    for _ in range(samples):
        start = clock()
        for _ in range(calls):
            fn(turn % copies)
            turn += 1
        best = min(best, (clock() - start) / calls)
    return best * 1e6


def bench_shape(out_features: int, in_features: int, cold: bool, samples: int, clock) -> list[list[str]]:
    weight = torch.randn(out_features, in_features) * 0.05
    q = quantize_nvfp4(weight)
    dense = dequantize_nvfp4(q, torch.bfloat16)
    copies = max(1, COLD_BYTES // (2 * dense.numel())) if cold else 1
    dense_copies = [dense.clone() for _ in range(copies)]
    packed_copies = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in dense_copies]
    q_copies = [(q.packed.clone(), q.block_scale.clone(), q.global_scale) for _ in range(copies)]
    table = []
    for rows in ROWS:
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        # Bursts of about 2 ms of bf16 work; the reference is far slower and gets single calls.
        calls = max(1, int(2e7 // (rows * dense.numel() + 10 * dense.numel())))
        plain = best_time_us(lambda i: F.linear(x, dense_copies[i]), copies, samples, calls, clock)
        onednn = best_time_us(
            lambda i: torch.ops.mkldnn._linear_pointwise(x, packed_copies[i], None, "none", [], ""), copies, samples, calls
        )
        reference = best_time_us(
            lambda i: F.linear(x, dequantize_nvfp4(type(q)(*q_copies[i]), torch.bfloat16)), copies, max(3, samples // 4), 1, clock
        )
        kernel = best_time_us(lambda i: cpu_nvfp4.nvfp4_linear(x, *q_copies[i]), copies, samples, calls, clock)
        table.append([f"{rows}", f"{plain:.0f}", f"{onednn:.0f}", f"{reference:.0f}", f"{kernel:.0f}", f"{kernel / min(plain, onednn):.2f}x"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--torch-path", action="store_true", help="time the torch fallback instead of the C kernel")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: this thread's CPU time, which other processes on a busy machine do not inflate (needs --threads 1)",
    )
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.torch_path:
        cpu_nvfp4.kernel = lambda: None  # the torch fallback, as on a machine without a C compiler
    path = "torch fallback" if not cpu_nvfp4.kernel_available() else "C kernel"
    print(
        f"NVFP4 W4A16 linear ({path}), bf16 activations, {args.threads} threads, us per call "
        f"({args.clock} clock), best of {args.samples} bursts"
    )
    header = "| cache | shape | rows | bf16 F.linear | bf16 oneDNN packed | reference | kernel | kernel / best bf16 |"
    print(header)
    print("|" + " --- |" * 3 + " ---: |" * 5)
    for cold in (False, True):
        for name in args.shapes:
            for row in bench_shape(*SHAPES[name], cold=cold, samples=args.samples, clock=clock):
                print(f"| {'cold' if cold else 'hot'} | {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
