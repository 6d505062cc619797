"""--kv-cache-dtype through the engine, on tiny Llama checkpoints written by transformers.

Checkpoint k/v scales in the names vLLM reads (compressed-tensors, ModelOpt, legacy kv_scale) load
into the attention layers and are what the cache is written with: the fp8 cache of a prompt,
scaled back, equals the float32 cache of the same prompt within fp8 rounding. Calibration takes
the first prefill's amax. Quantized caches keep prefix caching and chunked prefill consistent
(a token's logprob does not depend on whether its context came from the cache). Bad scales and
bad flag combinations fail with errors that name the problem.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import save_file

from fp4serve import LLM, SamplingParams
from fp4serve.errors import CheckpointError, ConfigError
from fp4serve.formats.safetensors_io import iter_tensors

PROMPT = {"prompt_token_ids": [5, 17, 42, 8, 99, 3, 250, 11, 64, 7, 123, 31, 200, 9, 77, 150, 2, 48, 91, 33, 18]}
ENGINE = {"dtype": "float32", "kv_cache_memory": "1MiB", "max_model_len": 128}
ONE_TOKEN = SamplingParams(temperature=0.0, max_tokens=1)


def tiny_llama(head_dim: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=300, hidden_size=4 * head_dim, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def exact_caches(checkpoint):
    """Each layer's float32 K/V cache after PROMPT: the values themselves."""
    return prompt_caches(float32_cache_engine(checkpoint))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """head_dim 16: one nvfp4 block per head."""
    path = tmp_path_factory.mktemp("tiny-llama-d16")
    make_checkpoint(path, tiny_llama(16), seed=3)
    return path


def with_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, dst)
    tensors = dict(iter_tensors(src))
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file({**tensors, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def attention_layers(llm: LLM):
    return [layer.self_attn.attn for layer in llm.engine.model.model.layers]


def prompt_caches(llm: LLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's K and V cache after a one-token generate of PROMPT on a fresh engine."""
    llm.generate(PROMPT, ONE_TOKEN)
    return [(a.k_cache, a.v_cache) for a in attention_layers(llm)]


def float32_cache_engine(path: Path) -> LLM:
    """4x the memory of ENGINE: as many blocks as an fp8 engine has, so a prompt lands in the same ones."""
    return LLM(str(path), **{**ENGINE, "kv_cache_memory": "4MiB"})


SCALES = {"k": [0.01, 0.04], "v": [0.02, 0.005]}
NAMINGS = {
    "compressed-tensors": lambda i, w: [f"model.layers.{i}.self_attn.{w}_scale"],
    "modelopt": lambda i, w: [f"model.layers.{i}.self_attn.{w}_proj.{w}_scale"],
    "vllm": lambda i, w: [f"model.layers.{i}.self_attn.attn.{w}_scale"],
}


@pytest.mark.parametrize("naming", NAMINGS)
def test_checkpoint_scales_load_and_write_the_cache(checkpoint, exact_caches, tmp_path, naming, caplog):
    extra = {name: torch.tensor(SCALES[w][i]) for i in range(2) for w in "kv" for name in NAMINGS[naming](i, w)}
    path = with_tensors(checkpoint, tmp_path / naming, extra)
    with caplog.at_level(logging.INFO, logger="fp4serve.engine"):
        fp8 = LLM(str(path), kv_cache_dtype="fp8", **ENGINE)
    assert any("KV cache: fp8_e4m3" in r.getMessage() and "from the checkpoint (2 layers)" in r.getMessage() for r in caplog.records)
    for i, attn in enumerate(attention_layers(fp8)):
        assert attn.loaded_scales == {"k", "v"}
        assert attn.k_scale.item() == pytest.approx(SCALES["k"][i]) and attn.v_scale.item() == pytest.approx(SCALES["v"][i])
    for i, ((k8, v8), (k, v)) in enumerate(zip(prompt_caches(fp8), exact_caches)):
        for raw, ref, scale in ((k8, k, SCALES["k"][i]), (v8, v, SCALES["v"][i])):
            assert ref.abs().max() / scale > 10, "the scale must matter: stored values are far from the originals"
            if i == 0:  # layer 0's K/V come from the embeddings alone: equal up to fp8 rounding
                torch.testing.assert_close(raw.float() * scale, ref, rtol=1 / 16, atol=scale * 2**-9)
            else:  # later layers see the rounding of the layers before
                assert (raw.float() * scale - ref).norm() < 0.1 * ref.norm()


def test_legacy_kv_scale_fills_both(checkpoint, tmp_path):
    extra = {f"model.layers.{i}.self_attn.kv_scale": torch.tensor([0.03]) for i in range(2)}
    llm = LLM(str(with_tensors(checkpoint, tmp_path / "legacy", extra)), kv_cache_dtype="fp8", **ENGINE)
    for attn in attention_layers(llm):
        assert attn.loaded_scales == {"k", "v"} and attn.k_scale.item() == attn.v_scale.item() == pytest.approx(0.03)


def test_checkpoint_scales_unused_with_a_plain_cache(checkpoint, tmp_path, caplog):
    extra = {f"model.layers.{i}.self_attn.{w}_scale": torch.tensor(0.5) for i in range(2) for w in "kv"}
    path = with_tensors(checkpoint, tmp_path / "unused", extra)
    with caplog.at_level(logging.INFO, logger="fp4serve.engine"):
        llm = LLM(str(path), **ENGINE)
    assert any("scales of 2 layers are unused" in r.getMessage() for r in caplog.records)
    ref = LLM(str(checkpoint), **ENGINE)
    assert llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].token_ids == \
        ref.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].token_ids  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model.layers.0.self_attn.k_scale": torch.tensor([0.1, 0.2])}, "has one element, this one has shape (2,)"),
        ({"model.layers.0.self_attn.k_scale": torch.tensor(0.0)}, "must be finite and positive, got 0.0"),
        ({"model.layers.1.self_attn.v_scale": torch.tensor(-1.0)}, "must be finite and positive"),
        ({"model.layers.1.self_attn.v_scale": torch.tensor(float("nan"))}, "must be finite and positive"),
        (
            {"model.layers.0.self_attn.k_scale": torch.tensor(0.1), "model.layers.0.self_attn.k_proj.k_scale": torch.tensor(0.1)},
            "appears twice",
        ),
        ({"model.layers.5.self_attn.k_scale": torch.tensor(0.1)}, "unexpected tensors (no parameter takes them): model.layers.5"),
    ],
    ids=["shape", "zero", "negative", "nan", "twice", "no-such-layer"],
)
def test_bad_checkpoint_scales_are_named(checkpoint, tmp_path, extra, message):
    path = with_tensors(checkpoint, tmp_path / "bad", extra)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        LLM(str(path), kv_cache_dtype="fp8", **ENGINE)


def test_bad_flag_combinations(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--calculate-kv-scales"):
        LLM(str(checkpoint), calculate_kv_scales=True, **ENGINE)
    with pytest.raises(ConfigError, match="--kv-cache-dtype 'fp4'"):
        LLM(str(checkpoint), kv_cache_dtype="fp4", **ENGINE)
    narrow = tmp_path / "head-dim-8"
    make_checkpoint(narrow, tiny_llama(8))
    with pytest.raises(ConfigError, match="head_dim 8"):
        LLM(str(narrow), kv_cache_dtype="nvfp4", **ENGINE)
    LLM(str(narrow), kv_cache_dtype="fp8", **ENGINE)  # fp8 has no block constraint


@pytest.mark.parametrize("kv_cache_dtype, top", [("fp8", 448.0), ("nvfp4", 6 * 448.0)])
def test_calculate_kv_scales_takes_the_first_prefill_amax(checkpoint, exact_caches, kv_cache_dtype, top, caplog):
    with caplog.at_level(logging.INFO, logger="fp4serve.engine"):
        llm = LLM(str(checkpoint), kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=True, **ENGINE)
    assert any("calibrated per layer on the first prefill" in r.getMessage() for r in caplog.records)
    prompt_caches(llm)
    llm.generate({"prompt_token_ids": [1] * 50}, ONE_TOKEN)  # a later prefill changes nothing
    # The float32 caches hold zeros except the prompt's K/V. Layer 0's K/V depend on the embeddings
    # alone; layer 1 sees layer 0's quantized attention (a few % off at most).
    for rel, attn, (k, v) in zip([1e-5, 0.05], attention_layers(llm), exact_caches):
        assert attn.k_scale.item() == pytest.approx(k.abs().max().item() / top, rel=rel)
        assert attn.v_scale.item() == pytest.approx(v.abs().max().item() / top, rel=rel)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "nvfp4"])
def test_prefix_cache_hits_and_chunks_give_the_same_logprobs(checkpoint, kv_cache_dtype):
    """The same prompt computed in one step, again through a prefix-cache hit, and in chunks of 8
    must give the same greedy tokens and logprobs: every path attends to the dequantized cache."""
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
    whole = LLM(str(checkpoint), kv_cache_dtype=kv_cache_dtype, **ENGINE)
    first = whole.generate(PROMPT, params)[0]
    again = whole.generate(PROMPT, params)[0]
    assert again.num_cached_tokens == 16
    chunked = LLM(str(checkpoint), kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=8, **ENGINE)
    pieces = chunked.generate(PROMPT, params)[0]
    for out in (again, pieces):
        assert out.outputs[0].token_ids == first.outputs[0].token_ids
        lp, ref = ([step.logprob for step in o.outputs[0].logprobs] for o in (out, first))
        assert lp == pytest.approx(ref, abs=2e-5)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "nvfp4"])
def test_hybrid_qwen3_5_quantizes_attention_only(tmp_path, kv_cache_dtype):
    """Gated DeltaNet state stays float32 while the full-attention layer's KV is quantized, and the
    hybrid model gives the same greedy tokens and logprobs whole and in chunks."""
    import transformers

    text = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
            "layer_types": ["linear_attention", "full_attention"], "max_position_embeddings": 128}  # fmt: skip
    make_checkpoint(tmp_path, transformers.Qwen3_5TextConfig(**text))
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
    outs = []
    for chunk in (2048, 8):
        llm = LLM(str(tmp_path), kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=chunk, max_num_seqs=4, **ENGINE)
        layers = llm.engine.model.cache_layers()
        assert {str(m.k_cache.dtype) for m in layers if hasattr(m, "k_cache")} == {str(llm.engine.capacity.kv_format.storage_dtype)}
        assert {t.dtype for m in layers if not hasattr(m, "k_cache") for t in vars(m).values() if isinstance(t, torch.Tensor)} == {torch.float32}
        outs.append(llm.generate(PROMPT, params)[0].outputs[0])
    assert outs[0].token_ids == outs[1].token_ids
    assert [s.logprob for s in outs[0].logprobs] == pytest.approx([s.logprob for s in outs[1].logprobs], abs=2e-5)
