"""`fp4serve quantize SRC OUT` and `fp4serve eval QUANT --base BASE` (docs/quantization.md)."""

from __future__ import annotations

import argparse
import json


def add_quantize_parsers(sub, common: argparse.ArgumentParser) -> None:
    from fp4serve.quantize.pipeline import ALGORITHMS, KV_CACHE
    from fp4serve.quantize.recipes import RECIPES

    q = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a 16-bit checkpoint to NVFP4 (compressed-tensors or ModelOpt layout), layer by layer",
        description="Quantize SRC into the new directory OUT, one decoder layer at a time (memory: about one "
        "layer plus the calibration activations). The recipe decides which Linears become NVFP4; embeddings, "
        "lm_head, norms, GDN conv1d/A_log/dt_bias, MoE routers, shared-expert gates, mtp.* and the vision tower "
        "stay 16-bit.",
    )
    q.add_argument("src", help="the 16-bit checkpoint directory")
    q.add_argument("out", help="the new output directory (must not exist)")
    q.add_argument("--recipe", choices=list(RECIPES), default="regular",
                   help="regular: GDN linear_attn projections stay 16-bit; xs: they are NVFP4 too")  # fmt: skip
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep matching modules 16-bit (fnmatch on the checkpoint's module names; repeatable)")  # fmt: skip
    q.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="quantize matching modules the recipe keeps 16-bit (repeatable)")  # fmt: skip
    q.add_argument("--format", dest="fmt", choices=["compressed-tensors", "modelopt"], default="compressed-tensors")
    q.add_argument("--algorithm", choices=list(ALGORITHMS), default="max",
                   help="max: round to nearest with amax scales; awq-lite/awq-clip/awq-full: activation-aware "
                   "scale and clip searches")  # fmt: skip
    q.add_argument("--w4a4", action="store_true", help="also store static activation global scales (calibrated amax)")
    q.add_argument("--kv-cache", choices=list(KV_CACHE), default=None, help="store calibrated k/v scales")
    q.add_argument("--calib-data", default=None, metavar="FILE",
                   help='JSONL of {"text": ...} or {"messages": [...]} (default: a small bundled set)')  # fmt: skip
    q.add_argument("--num-samples", type=int, default=16)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--mtp-from", default=None, metavar="BASE", help="graft BASE's 16-bit mtp.* head (graft-mtp)")
    q.add_argument("--strip-vision", action="store_true", help="remove the vision tower (strip-vision)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "eval",
        parents=[common],
        help="compare a quantized checkpoint with its 16-bit base: KL, top-1, perplexity, per-layer error",
        description="Run QUANT and BASE over one text and report KL(base || quant), top-1 agreement, the "
        "perplexity of each, and the relative output error of the worst decoder layers.",
    )
    e.add_argument("quant", help="the quantized checkpoint")
    e.add_argument("--base", required=True, help="the 16-bit checkpoint it was made from")
    e.add_argument("--text", default=None, metavar="FILE", help="text to evaluate on (default: a bundled text)")
    e.add_argument("--max-tokens", type=int, default=1024, help="evaluate on at most this many tokens")
    e.add_argument("--worst-layers", type=int, default=5, help="how many layers to list")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    e.add_argument("--json", action="store_true", help="print the figures as JSON")
    e.set_defaults(func=cmd_eval)


def cmd_quantize(args) -> None:
    from fp4serve.quantize.pipeline import QuantizeOptions, quantize_checkpoint
    from fp4serve.quantize.recipes import Recipe

    options = QuantizeOptions(
        recipe=Recipe(args.recipe, exclude=args.exclude, include=args.include),
        fmt=args.fmt,
        algorithm=args.algorithm,
        w4a4=args.w4a4,
        kv_cache=args.kv_cache,
        calib_data=args.calib_data,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        mtp_from=args.mtp_from,
        strip_vision=args.strip_vision,
    )
    report = quantize_checkpoint(args.src, args.out, options, progress=not args.no_progress)
    print("\n".join(report.lines()))


def cmd_eval(args) -> None:
    from fp4serve.quantize.evaluate import evaluate, format_table

    figures = evaluate(args.quant, args.base, args.text, args.max_tokens, args.worst_layers, args.dtype)
    print(json.dumps(figures, indent=2) if args.json else format_table(figures))
