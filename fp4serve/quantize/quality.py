"""How far a quantized model's next-token distributions are from the 16-bit model's.

KL(p_ref || p_quant) per position and top-1 agreement over a fixed text, computed in fp32 from
full-sequence logits (one prefill with the model's own caches, no engine)."""

from __future__ import annotations

from pathlib import Path

import torch

from fp4serve.config import ModelInfo
from fp4serve.engine.cache import allocate_caches
from fp4serve.formats.checkpoint import resolve_quantization
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.models.loader import load_model

BLOCK_SIZE = 16

# A fixed English text (written for this project) for quality figures.
EVAL_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a tin of oil and a "
    "notebook in which he wrote the weather, the ships he saw and the state of the lamp. In winter the wind "
    "came off the sea so hard that the glass hummed, and he learned to tell a storm's strength by the note "
    "it made. When the harbour board replaced the lamp with an electric beacon, they offered him a cottage "
    "in the village and a pension. He accepted the pension but kept climbing the stairs, because the "
    "notebook was not finished: it had three hundred and twelve pages, and he had filled two hundred and "
    "ninety. Engineers measure a quantized model the same way the keeper measured storms: not by a single "
    "reading, but by how closely thousands of small predictions agree with the original, one token at a time."
)


def load_for_eval(
    path: str | Path,
    dtype: torch.dtype,
    quantization: str | None = None,
    compute: str = "w4a16",
    nvfp4_lm_head: bool = False,
):
    """A model with caches for one sequence of up to 4096 tokens (None quantization: as the files say)."""
    info = ModelInfo.load(path)
    quant = resolve_quantization(quantization, info.quant, path)
    model = load_model(info, dtype, torch.device("cpu"), quant, compute, nvfp4_lm_head)
    allocate_caches(model.cache_layers(), 1, 4096 * 1024 * 64, BLOCK_SIZE, dtype, torch.device("cpu"))
    return model


def sequence_logits(model, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits [n, vocab] for every position of one sequence, in a single prefill."""
    blocks = list(range(-(-len(token_ids) // BLOCK_SIZE)))
    batch = build_batch([SequenceRows(list(token_ids), 0, blocks)], BLOCK_SIZE)
    with torch.inference_mode():
        return model.compute_logits(model(batch)).float()


def compare_logits(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Mean and max per-position KL(reference || test) in nats, top-1 agreement, max |logit diff|."""
    ref_logp = torch.log_softmax(reference.float(), dim=-1)
    test_logp = torch.log_softmax(test.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1)
    agree = (reference.argmax(-1) == test.argmax(-1)).float().mean()
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1_agreement": agree.item(),
        "max_abs_logit_diff": (reference.float() - test.float()).abs().max().item(),
    }
