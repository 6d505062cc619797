"""Speculative decoding on the embedded default model: decode tok/s and acceptance, with and without
drafting, per prompt category at concurrency 1.

Categories: `edit` (rewrite a given code snippet) and `extract` (pull fields out of a given text),
where the answer copies the prompt and prompt lookup hits, and `prose` (free writing), where it
rarely does. Methods: none, ngram (prompt lookup) and dflash with a random-weight drafter (no
trained drafter exists for SmolLM2, so its row measures the cost of drafting and verifying only;
MTP heads exist only for Qwen3.5 targets, not for this Llama model). Greedy decoding, so every
method produces the same text. Each figure is the best of --repeats runs (shared CPUs are noisy).
Run:  python benchmarks/speculative.py
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fp4serve import LLM, SamplingParams

CODE = '''def moving_average(values, window):
    result = []
    for i in range(len(values) - window + 1):
        chunk = values[i:i + window]
        result.append(sum(chunk) / window)
    return result
'''
RECORD = (
    "Order 4471 was placed by Maria Lopez (maria.lopez@example.com) on 2024-03-18 for 3 units of the "
    "Trailblazer 40L backpack at 89.90 EUR each, shipped to 12 Rue des Lilas, 69003 Lyon, France."
)
PROMPTS = {
    "edit": [
        f"Rename the function moving_average to rolling_mean and keep everything else the same:\n\n{CODE}",
        f"Add a docstring to this function and return the whole function:\n\n{CODE}",
        f"Rewrite this function with the variable result renamed to averages:\n\n{CODE}",
    ],
    "extract": [
        f"Extract the customer name, email, date and city from this text as JSON:\n\n{RECORD}",
        f"Copy the shipping address from this order, exactly as written:\n\n{RECORD}",
        f"List every number that appears in this text, with the words around it:\n\n{RECORD}",
    ],
    "prose": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Describe a walk through a forest in autumn.",
        "Explain why the sky is blue to a ten-year-old.",
    ],
}


def write_random_dflash_drafter(path: Path, target_config, num_layers: int, block_size: int) -> None:
    """A z-lab-layout DFlash drafter with random weights, shaped for `target_config`."""
    H, L = target_config.hidden_size, target_config.num_hidden_layers
    heads, kv_heads = target_config.num_attention_heads, target_config.num_key_value_heads
    head_dim, inter = H // heads, target_config.intermediate_size
    layer_ids = [round(1 + i * (L - 4) / (num_layers - 1)) for i in range(num_layers)] if num_layers > 1 else [L // 2]
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": H, "num_hidden_layers": num_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "intermediate_size": inter, "rms_norm_eps": 1e-6, "vocab_size": target_config.vocab_size,
        "max_position_embeddings": 8192, "rope_theta": 10000.0, "block_size": block_size, "num_target_layers": L,
        "dflash_config": {"mask_token_id": 0, "target_layer_ids": layer_ids},
    }  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"fc.weight": rand(H, num_layers * H), "hidden_norm.weight": torch.ones(H), "norm.weight": torch.ones(H)}
    q, kv = heads * head_dim, kv_heads * head_dim
    for i in range(num_layers):
        p = f"layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": rand(q, H), p + "self_attn.k_proj.weight": rand(kv, H),
            p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, q),
            p + "self_attn.q_norm.weight": torch.ones(head_dim), p + "self_attn.k_norm.weight": torch.ones(head_dim),
            p + "mlp.gate_proj.weight": rand(inter, H), p + "mlp.up_proj.weight": rand(inter, H),
            p + "mlp.down_proj.weight": rand(H, inter),
        })  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def decode_run(llm: LLM, prompt_ids: list[int], max_tokens: int) -> tuple[int, float]:
    """One request alone; returns (tokens after the first, seconds after the first step)."""
    engine = llm.engine
    engine.add_request({"prompt_token_ids": prompt_ids}, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    engine.step()  # prefill and the first token
    start = time.perf_counter()
    tokens = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens += len(output.delta_token_ids)
    return tokens, time.perf_counter() - start


def measure(llm: LLM, prompts: list[list[int]], max_tokens: int, repeats: int) -> tuple[float, float, float]:
    """(decode tok/s over the category's prompts, best of `repeats`; mean acceptance length; acceptance rate)."""
    stats = llm.engine.spec_stats
    before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) if stats else None
    rates = []
    for _ in range(repeats):
        tokens = seconds = 0.0
        for p in prompts:
            n, s = decode_run(llm, p, max_tokens)
            tokens, seconds = tokens + n, seconds + s
        rates.append(tokens / seconds)
    if stats is None:
        return max(rates), 1.0, 0.0
    drafts, draft_tokens, accepted = (now - then for now, then in zip(
        (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens), before))  # fmt: skip
    return max(rates), 1 + accepted / max(drafts, 1), accepted / max(draft_tokens, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens for ngram")
    parser.add_argument("--dflash-block", type=int, default=8, help="random DFlash drafter's block size")
    parser.add_argument("--methods", nargs="+", default=["none", "ngram", "dflash"])
    parser.add_argument("--categories", nargs="+", default=list(PROMPTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(dtype=args.dtype, max_model_len=2048, kv_cache_memory="512MiB", enable_prefix_caching=False)
    plain = LLM(args.model, **common)
    tokenizer = plain.get_tokenizer()
    prompts = {c: [plain.apply_chat_template([{"role": "user", "content": text}]) for text in PROMPTS[c]] for c in args.categories}
    tmp = Path(tempfile.mkdtemp())
    specs = {
        "none": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
        "dflash": {"method": "dflash", "model": str(tmp / "dflash")},
    }
    if "dflash" in args.methods:
        write_random_dflash_drafter(tmp / "dflash", plain.engine.info.text_config, 2, args.dflash_block)
    rows = []
    for method in args.methods:
        llm = plain if method == "none" else LLM(args.model, speculative_config=specs[method], **common)
        decode_run(llm, prompts[args.categories[0]][0], 8)  # warm-up
        for category in args.categories:
            rate, length, acceptance = measure(llm, prompts[category], args.max_tokens, args.repeats)
            rows.append((category, method, rate, length, acceptance))
            print(f"  measured {category} / {method}: {rate:.1f} tok/s", flush=True)  # progress: runs are slow
    base = {c: r for c, m, r, _, _ in rows if m == "none"}
    print(f"\nmodel {plain.engine.model_path.name}, {args.dtype}, {torch.get_num_threads()} threads, c=1, greedy, "
          f"max_tokens {args.max_tokens}, ngram k={args.k}, dflash block {args.dflash_block} (random weights), "
          f"best of {args.repeats}, tokenizer {type(tokenizer).__name__}")  # fmt: skip
    print(f"{'category':<10}{'method':<8}{'decode tok/s':>14}{'vs none':>9}{'accept len':>12}{'accept rate':>13}")
    for category, method, rate, length, acceptance in rows:
        ratio = f"{rate / base[category]:.2f}x" if category in base else "-"
        print(f"{category:<10}{method:<8}{rate:>14.1f}{ratio:>9}{length:>12.2f}{acceptance:>13.1%}")


if __name__ == "__main__":
    main()
