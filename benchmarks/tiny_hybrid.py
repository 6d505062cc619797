"""A small random hybrid Qwen3.5 (8 layers: GDN, GDN, GDN, attention, twice; hidden 256) with an
MTP head, and a DFlash drafter for it, built by transformers as the tests build them
(tests/spec_checkpoints.py), with a word-level tokenizer and a chat template: the model the hybrid
benchmarks serve. Random weights: figures of caching and correctness, not of quality.
Run:  python benchmarks/tiny_hybrid.py DIR      # writes DIR/target and DIR/dflash
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parents[1] / "tests")]  # the tiny-checkpoint builders

from spec_checkpoints import make_dflash_drafter, make_mtp_target  # noqa: E402

LAYERS = ["linear_attention"] * 3 + ["full_attention"]
SIZE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8, "layer_types": LAYERS * 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "linear_num_key_heads": 4,
        "linear_num_value_heads": 8, "linear_key_head_dim": 32, "linear_value_head_dim": 32}  # fmt: skip


def build_tiny_hybrid(root: Path) -> tuple[Path, Path]:
    """(target directory, DFlash drafter directory) under `root`."""
    hf = make_mtp_target(root / "target", **SIZE)
    make_dflash_drafter(root / "dflash", hf.config, num_layers=2, block_size=4, head_dim=32,
                        num_attention_heads=8, target_layer_ids=[1, 5])  # fmt: skip
    return root / "target", root / "dflash"


if __name__ == "__main__":
    target, drafter = build_tiny_hybrid(Path(sys.argv[1]))
    print(f"target: {target}\nDFlash drafter: {drafter}")
