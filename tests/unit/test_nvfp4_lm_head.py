"""--nvfp4-lm-head: the 16-bit output projection quantized to NVFP4 W4A16 at load, tied or not."""
from __future__ import annotations

import pytest
import torch

from fp4serve import LLM, SamplingParams
from fp4serve.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-bias"])
def test_the_head_is_the_codec_quantization_of_the_16_bit_head(llama_family_checkpoints, name):
    path, _ = llama_family_checkpoints[name]
    plain = LLM(str(path), dtype="float32", kv_cache_memory="4MiB")
    quantized = LLM(str(path), dtype="float32", kv_cache_memory="4MiB", nvfp4_lm_head=True)
    head = quantized.engine.model.lm_head
    assert isinstance(head.method, NVFP4LinearMethod)
    original = plain.engine.model.lm_head.weight.detach()
    # the weights it holds are the codec's quantization of the original head (one global scale)
    expected = dequantize_nvfp4(quantize_nvfp4(original))
    assert torch.equal(head.method.dequantized_weight(head), expected)
    # the embedding lookups of a tied model still read the 16-bit table
    embed = quantized.engine.model.model.embed_tokens.weight
    assert torch.equal(embed, plain.engine.model.model.embed_tokens.weight)
    hidden = torch.randn(3, original.shape[1])
    torch.testing.assert_close(quantized.engine.model.compute_logits(hidden), hidden @ expected.T, rtol=1e-5, atol=1e-5)
    out = quantized.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
