"""The oneDNN packed bf16 Linear (layers/packed_linear.py) against the plain reference method."""
from __future__ import annotations

import pytest
import torch

from fp4serve import LLM, SamplingParams
from fp4serve.layers.linear import Linear
from fp4serve.layers.packed_linear import PackedCPULinearMethod, pack_linear, packing_available

pytestmark = pytest.mark.skipif(
    not packing_available(torch.bfloat16, torch.device("cpu")), reason="torch built without oneDNN linear packing"
)


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_plain(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(96, [64, 32, 32], bias=bias, dtype=torch.bfloat16)
    layer.weight.data.normal_(0, 0.05)
    if bias:
        layer.bias.data.normal_(0, 0.1)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    expected = layer(x)
    pack_linear(layer)
    assert isinstance(layer.method, PackedCPULinearMethod) and not hasattr(layer, "weight")
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    # Same bf16 GEMM underneath; allow one bf16 rounding step of difference.
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=8e-3)


def test_bf16_engine_packs_and_generates_like_unpacked(llama_family_checkpoints, monkeypatch):
    path, _ = llama_family_checkpoints["llama-tied"]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(10, 40))}
    packed = LLM(str(path), dtype="bfloat16", kv_cache_memory="4MiB")
    assert isinstance(packed.engine.model.lm_head.method, PackedCPULinearMethod)
    # The tied head was packed from the embedding table, which stays in place for the lookup.
    assert packed.engine.model.model.embed_tokens.weight.shape == (300, 64)
    monkeypatch.setattr("fp4serve.models.loader.packing_available", lambda dtype, device: False)
    plain = LLM(str(path), dtype="bfloat16", kv_cache_memory="4MiB")
    assert not isinstance(plain.engine.model.lm_head.method, PackedCPULinearMethod)
    ids = lambda llm: llm.generate(prompt, greedy)[0].outputs[0].token_ids  # noqa: E731
    assert ids(packed) == ids(plain)
