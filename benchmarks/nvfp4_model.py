"""The default model in bf16, NVFP4 W4A16 and NVFP4 W4A4 (quantized at load), with or without an NVFP4
lm_head (--nvfp4-lm-head): weight memory,
decode tok/s at c=1 and c=32, prefill tok/s, and quality against bf16 (mean KL in nats and top-1
agreement over quantize.quality.EVAL_TEXT). Figures are best of --repeats runs.
Run:  python benchmarks/nvfp4_model.py
"""
from __future__ import annotations

import argparse

import torch
from offline_throughput import engine_rows

from fp4serve import LLM
from fp4serve.layers.linear import Linear
from fp4serve.quantize.quality import EVAL_TEXT, compare_logits, load_for_eval, sequence_logits
from fp4serve.tokenizer import load_tokenizer

# mode -> (quantization, nvfp4 compute, --nvfp4-lm-head)
MODES = {
    "bf16": (None, "auto", False), "nvfp4-w4a16": ("nvfp4", "w4a16", False), "nvfp4-w4a4": ("nvfp4", "w4a4", False),
    "nvfp4-w4a16-head": ("nvfp4", "w4a16", True), "bf16-nvfp4-head": (None, "auto", True),
}  # fmt: skip


def linear_weight_mib(model) -> float:
    """Every Linear but a tied lm_head (which is the embedding table)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    layers = [m for name, m in model.named_modules() if isinstance(m, Linear) and not (tied and name == "lm_head")]
    return sum(m.method.weight_bytes(m) for m in layers) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--modes", nargs="+", default=["bf16", "nvfp4-w4a16", "nvfp4-w4a4"], choices=list(MODES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    reference_logits = None
    table = []
    for mode in args.modes:
        quantization, compute, head = MODES[mode]
        llm = LLM(args.model, dtype="bfloat16", quantization=quantization, nvfp4_compute=compute, nvfp4_lm_head=head,
                  max_num_seqs=max(args.concurrency), enable_prefix_caching=False)  # fmt: skip
        path = llm.engine.model_path
        rates = {w: r for _, w, r in engine_rows(llm, args.concurrency, args.decode_tokens, args.prefill_prompts, args.repeats)}
        mib = linear_weight_mib(llm.engine.model)
        del llm
        ids = load_tokenizer(path).encode(EVAL_TEXT)
        logits = sequence_logits(load_for_eval(path, torch.bfloat16, quantization, "w4a16" if compute == "auto" else compute, head), ids)
        if reference_logits is None:
            reference_logits = logits
        quality = compare_logits(reference_logits, logits)
        table.append((mode, mib, rates, quality))

    print(f"\nmodel {path.name}, {torch.get_num_threads()} threads, torch {torch.__version__}; best of {args.repeats}")
    workloads = list(table[0][2])
    print(f"{'mode':<14}{'Linear MiB':>11}" + "".join(f"{w:>16}" for w in workloads) + f"{'KL (nats)':>11}{'top-1':>8}")
    for mode, mib, rates, quality in table:
        print(f"{mode:<14}{mib:>11.1f}" + "".join(f"{rates[w]:>16.1f}" for w in workloads)
              + f"{quality['kl_mean']:>11.4f}{quality['top1_agreement']:>8.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
