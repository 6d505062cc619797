"""The real SmolLM2 weights quantized at load (`--quantization nvfp4`): close to the 16-bit model.

The figures themselves (KL, top-1 agreement) are benchmark results in docs/benchmarks.md
(benchmarks/nvfp4_model.py); here only sane bounds: measured on this text, W4A16 gives mean KL
0.19 nats and 71% top-1 agreement, W4A4 0.45 and 56%. Random weights would give KL of several nats and
~0% agreement, and a broken codec (e.g. swapped nibbles) does too, so the bounds separate "quantized"
from "broken" with a wide margin either way."""
from __future__ import annotations

import pytest
import torch

from fp4serve import LLM, SamplingParams
from fp4serve.layers.linear import Linear
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod
from fp4serve.quantize.quality import EVAL_TEXT, compare_logits, load_for_eval, sequence_logits
from fp4serve.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def reference(smollm2_path):
    ids = load_tokenizer(smollm2_path).encode(EVAL_TEXT)
    return ids, sequence_logits(load_for_eval(smollm2_path, torch.bfloat16), ids)


def test_on_the_fly_nvfp4_stays_close_to_bf16(smollm2_path, reference):
    """W4A16 only: W4A4's numerics are checked against compressed-tensors in the oracle tests."""
    ids, ref = reference
    model = load_for_eval(smollm2_path, torch.bfloat16, "nvfp4", "w4a16")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert sum(isinstance(m.method, NVFP4LinearMethod) for m in linears) == len(linears) - 1  # all but the tied lm_head
    figures = compare_logits(ref, sequence_logits(model, ids))
    assert figures["kl_mean"] < 0.5 and figures["top1_agreement"] > 0.55, figures


def test_llm_runs_the_default_model_in_4_bits(smollm2_path):
    llm = LLM(str(smollm2_path), quantization="nvfp4", kv_cache_memory="64MiB", max_model_len=512)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    assert len(out[0].outputs[0].token_ids) == 8 and out[0].outputs[0].text.strip()
