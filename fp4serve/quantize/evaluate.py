"""`fp4serve eval QUANT --base BASE`: how far a quantized checkpoint is from its 16-bit base on one
text. Both run the same tokens in one prefill each (quality.py): KL(base || quant) and top-1
agreement of the next-token distributions, the perplexity of each, and per decoder layer the
relative error of the quantized model's hidden state, ||h_q - h_b|| / ||h_b||, with how much each
layer added to it (the worst layers are where a recipe could keep more in 16 bits)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fp4serve.config import DTYPES
from fp4serve.errors import ConfigError
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.quantize.quality import BLOCK_SIZE, EVAL_TEXT, compare_logits, load_for_eval


def run_with_taps(model, token_ids: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 logits [n, vocab] and every decoder layer's output hidden state."""
    num_layers = model.config.num_hidden_layers
    blocks = list(range(-(-len(token_ids) // BLOCK_SIZE)))
    batch = build_batch([SequenceRows(list(token_ids), 0, blocks)], BLOCK_SIZE, capture_layers=tuple(range(num_layers)))
    with torch.inference_mode():
        logits = model.compute_logits(model(batch)).float()
    return logits, [batch.captures.hidden[i].float() for i in range(num_layers)]


def perplexity(logits: torch.Tensor, token_ids: list[int]) -> float:
    targets = torch.tensor(token_ids[1:])
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), targets).item())


def evaluate(quant: str, base: str, text_file: str | None, max_tokens: int, worst: int, dtype: str) -> dict:
    from transformers import AutoTokenizer

    text = EVAL_TEXT
    if text_file:
        if not Path(text_file).is_file():
            raise ConfigError(f"--text {text_file}: no such file")
        text = Path(text_file).read_text()
    ids = AutoTokenizer.from_pretrained(base)(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ConfigError("the evaluation text has fewer than two tokens")
    torch_dtype = DTYPES[dtype]
    base_logits, base_hidden = run_with_taps(load_for_eval(base, torch_dtype), ids)
    quant_model = load_for_eval(quant, torch_dtype)
    if quant_model.config.num_hidden_layers != len(base_hidden):
        raise ConfigError(f"{quant} and {base} have different numbers of layers")
    quant_logits, quant_hidden = run_with_taps(quant_model, ids)
    layers, previous = [], 0.0
    for i, (b, q) in enumerate(zip(base_hidden, quant_hidden)):
        error = ((q - b).norm() / b.norm().clamp(min=1e-12)).item()
        layers.append({"layer": i, "relative_error": error, "added": error - previous})
        previous = error
    figures = compare_logits(base_logits, quant_logits)
    return {
        "quant": str(quant),
        "base": str(base),
        "tokens": len(ids),
        "kl_mean": figures["kl_mean"],
        "kl_max": figures["kl_max"],
        "top1_agreement": figures["top1_agreement"],
        "ppl_base": perplexity(base_logits, ids),
        "ppl_quant": perplexity(quant_logits, ids),
        "final_hidden_error": layers[-1]["relative_error"],
        "worst_layers": sorted(layers, key=lambda r: -r["added"])[:worst],
    }


def format_table(f: dict) -> str:
    lines = [
        f"{f['quant']} vs {f['base']} over {f['tokens']} tokens",
        f"  KL(base || quant)  mean {f['kl_mean']:.5f}  max {f['kl_max']:.4f} nats",
        f"  top-1 agreement    {100 * f['top1_agreement']:.1f}%",
        f"  perplexity         base {f['ppl_base']:.3f}  quant {f['ppl_quant']:.3f}",
        f"  last-layer hidden relative error {f['final_hidden_error']:.4f}",
        "  layers adding the most error:",
        "    layer  relative error  added",
    ]
    lines += [f"    {r['layer']:>5}  {r['relative_error']:>14.4f}  {r['added']:>+.4f}" for r in f["worst_layers"]]
    return "\n".join(lines)
