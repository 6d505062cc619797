"""The GPU check: one command, one table, under 8 minutes on one GPU.

1. Each Triton kernel against its torch reference on the GPU (max error; bit mismatches for the KV write).
2. The NVFP4 GEMV's achieved bandwidth against the GPU's measured copy bandwidth (aim >= 80%).
3. Decode tok/s at batch 1, 8 and 64 of a random Qwen3.5 with the 27B dense layer shapes (hidden 5120,
   GDN and attention layers 3:1 as in the 27B's 48 + 16; truncated to --layers), NVFP4 (quantized at
   load) against the same model in bf16 (aim: NVFP4 >= 2.5x bf16 at batch 1) and against HF
   transformers running the bf16 checkpoint.
4. A greedy run of the default model (SmolLM2-135M) on the GPU equal to the CPU run (float32 both).

Run:  python benchmarks/gpu_check.py [--layers 8]
      python benchmarks/gpu_check.py --smoke      # toy sizes, any device (CI runs it on CPU under
                                                  # TRITON_INTERPRET=1 with FP4SERVE_TRITON=1)
The 27B shapes assumed (Qwen3.5-27B's config.json): 24 query heads and 4 KV heads of 256, intermediate
17408, GDN 16 key heads and 48 value heads of 128, conv kernel 4, vocabulary 248320.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent)]

from gpu_kernel_checks import kernel_rows  # noqa: E402

from fp4serve import LLM, SamplingParams  # noqa: E402

FULL = {
    "vocab_size": 248320, "hidden_size": 5120, "intermediate_size": 17408, "num_attention_heads": 24,
    "num_key_value_heads": 4, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 48,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}  # fmt: skip
SMOKE = {
    "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 10)
    return 2 * nbytes / seconds / 1e9


def gemv_bandwidth(device: torch.device, out_features: int, in_features: int) -> tuple[float, float]:
    """(GB/s, microseconds) of one NVFP4 GEMV (batch 1, bf16): packed codes + block scales + x + y bytes."""
    from fp4serve.formats.nvfp4 import quantize_nvfp4
    from fp4serve.kernels.triton_nvfp4 import nvfp4_linear_triton

    q = quantize_nvfp4(torch.randn(out_features, in_features, device=device))
    x = torch.randn(1, in_features, dtype=torch.bfloat16, device=device)
    seconds = timed(lambda: nvfp4_linear_triton(x, q.packed, q.block_scale, q.global_scale), device, 50)
    nbytes = q.packed.numel() + q.block_scale.numel() + 2 * (in_features + out_features)
    return nbytes / seconds / 1e9, seconds * 1e6


def write_model(path: Path, sizes: dict, layers: int, device: torch.device) -> torch.nn.Module:
    """A random bf16 Qwen3.5 of `layers` decoder layers (GDN, GDN, GDN, attention, ...), saved to
    path; returns the transformers model, on `device`."""
    import transformers

    types = (["linear_attention"] * 3 + ["full_attention"]) * (layers // 4) + ["linear_attention"] * (layers % 4)
    config = transformers.Qwen3_5TextConfig(**sizes, num_hidden_layers=layers, layer_types=types)
    config.architectures = ["Qwen3_5ForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(path)
    return model


def fp4serve_decode(llm: LLM, device: torch.device, batch: int, new_tokens: int) -> float:
    """Decode tok/s of fp4serve: `batch` 32-token prompts, every step after the prefills timed."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request({"prompt_token_ids": [1 + (i * 7 + j) % 200 for j in range(32)]}, params)
    engine.step()  # the prefills (one step: 32 x batch tokens fit the budget)
    sync(device)
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def hf_decode(model, device: torch.device, batch: int, new_tokens: int) -> float:
    """Decode tok/s of transformers' generate on the same weights: (time of new_tokens) - (time of 1)."""
    ids = torch.tensor([[1 + (i * 7 + j) % 200 for j in range(32)] for i in range(batch)], device=device)

    def generate(n):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        first = timed(lambda: generate(1), device, 1)
        whole = timed(lambda: generate(new_tokens), device, 1)
    return batch * (new_tokens - 1) / max(whole - first, 1e-9)


def default_model_agrees(device: torch.device, tokens: int) -> str:
    prompt = {"prompt_token_ids": [1, 9690, 198, 2683, 314, 253, 5356, 9552, 30]}
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    runs = []
    for where in (device, torch.device("cpu")):
        llm = LLM(None, device=str(where), dtype="float32", max_model_len=256)
        runs.append(llm.generate(prompt, params)[0].outputs[0].token_ids)
        del llm
    if runs[0] == runs[1]:
        return f"equal ({tokens} tokens)"
    first = next(i for i, (a, b) in enumerate(zip(*runs)) if a != b)
    return f"DIFFERENT from token {first}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the 27B-shaped model (of 64)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device: checks the script itself")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke
    rows: list[tuple[str, str, str]] = []  # (check, measured, aim)

    def add(check: str, measured: str, aim: str = "") -> None:
        rows.append((check, measured, aim))
        print(f"  {check}: {measured}", flush=True)

    started = time.perf_counter()
    for check, measured, aim in kernel_rows(device, smoke):
        add(check, measured, aim)

    copy = copy_bandwidth(device, (1 << 20) if smoke else (1 << 30))
    n, k = (64, 64) if smoke else (FULL["intermediate_size"] * 2, FULL["hidden_size"])
    gbs, micros = gemv_bandwidth(device, n, k)
    add("copy bandwidth", f"{copy:.0f} GB/s")
    add(f"NVFP4 GEMV {n}x{k} bf16, batch 1", f"{gbs:.0f} GB/s ({micros:.0f} us), {100 * gbs / copy:.0f}% of copy", ">= 80%")

    layers = 4 if smoke else args.layers
    new_tokens = 4 if smoke else 64
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3_5-27b-shaped"
        hf = write_model(path, SMOKE if smoke else FULL, layers, device)
        shape = f"{layers} layers ({layers - layers // 4} GDN + {layers // 4} attention)"
        batches = (1, 2) if smoke else (1, 8, 64)
        results = {}
        for batch in batches:
            results["hf", batch] = hf_decode(hf, device, batch, new_tokens)
        del hf
        gc.collect()
        for variant, quantization in (("nvfp4", "nvfp4"), ("bf16", None)):
            # --smoke on a CPU: float32, as fp4serve picks there (bf16 matmuls are emulated without AVX512-BF16)
            dtype = "float32" if smoke and device.type == "cpu" else "bfloat16"
            llm = LLM(str(path), device=str(device), dtype=dtype, quantization=quantization,
                      skip_tokenizer_init=True, max_num_seqs=max(batches), max_model_len=256,
                      max_num_batched_tokens=2048, kv_cache_memory="512MiB" if smoke else "8GiB")  # fmt: skip
            for batch in batches:
                results[variant, batch] = fp4serve_decode(llm, device, batch, new_tokens)
            del llm
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for batch in batches:
            nv, bf, hf_rate = results["nvfp4", batch], results["bf16", batch], results["hf", batch]
            aim = ">= 2.5x bf16" if batch == 1 else ""
            add(f"decode tok/s, {shape}, batch {batch}",
                f"NVFP4 {nv:.1f}, bf16 {bf:.1f} ({nv / bf:.2f}x), HF bf16 {hf_rate:.1f} ({nv / hf_rate:.2f}x)", aim)  # fmt: skip

    if smoke:
        add("default model on the device vs CPU", "skipped (--smoke)")
    else:
        add("default model on the device vs CPU, greedy fp32", default_model_agrees(device, 32), "equal")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s\n")
    print(f"| check | measured | aim |\n|---|---|---|")
    for check, measured, aim in rows:
        print(f"| {check} | {measured} | {aim} |")


if __name__ == "__main__":
    main()
