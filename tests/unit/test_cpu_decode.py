"""The fused C decode step (kernels/cpu_decode.py) against the per-layer torch path it replaces:
tiny Llama-family models (tied/untied heads, llama3/linear/yarn rope, q/k/v bias) in fp32, with
dense and NVFP4 weights, at several batch sizes and context lengths, with KV blocks that are not
contiguous; every C build this CPU can run; and the layers it must leave to torch."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import llama_family_configs, make_checkpoint

from fp4serve import LLM, SamplingParams
from fp4serve.kernels import cpu_build, cpu_decode
from fp4serve.kernels.cpu_features import cpu_features

pytestmark = pytest.mark.skipif(cpu_decode.cpu_library() is None, reason="no C compiler for the CPU kernels")

FUSED_NAMES = ["llama-tied", "llama3-rope-untied", "qwen2-bias", "llama-linear-rope", "llama-yarn"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    configs = llama_family_configs()
    out = {}
    for i, name in enumerate([*FUSED_NAMES, "qwen3-qknorm", "qwen2-sliding"]):
        path = tmp_path_factory.mktemp(name)
        make_checkpoint(path, configs[name], seed=i)
        out[name] = path
    return out


def prompts(n: int) -> list[dict]:
    # lengths across block boundaries (block_size 16), so decode reads several blocks per sequence
    return [{"prompt_token_ids": [(7 * i + 3 * j) % 290 + 5 for j in range(length)]} for i, length in enumerate((5, 16, 33, 47)[:n])]


def generate(path, mode: str, monkeypatch, n: int, **kwargs):
    monkeypatch.setenv(cpu_decode.ENV_VAR, mode)
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB", max_num_seqs=4, block_size=16, enable_prefix_caching=False, **kwargs)
    # a request first, then its blocks freed: later sequences get blocks out of order
    llm.generate(prompts(1), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts(n), params)
    return llm, [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]


def assert_same(fused, reference, atol):
    for (ids, logprobs), (ref_ids, ref_logprobs) in zip(fused, reference):
        assert ids == ref_ids
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("name", FUSED_NAMES)
@pytest.mark.parametrize("n", [1, 3])
def test_fused_decode_matches_the_torch_layers(checkpoints, monkeypatch, name, n):
    calls = []
    original = cpu_decode.FusedDecoder.__call__
    monkeypatch.setattr(cpu_decode.FusedDecoder, "__call__", lambda self, x, *a: calls.append(len(x)) or original(self, x, *a))
    llm, fused = generate(checkpoints[name], "fused", monkeypatch, n)
    assert calls.count(n) >= 11  # every decode step after the first token ran fused, with all n rows
    _, reference = generate(checkpoints[name], "torch", monkeypatch, n)
    assert_same(fused, reference, atol=2e-4)


@pytest.mark.parametrize("n", [1, 4])
def test_fused_decode_with_nvfp4_weights(checkpoints, monkeypatch, n):
    llm, fused = generate(checkpoints["qwen2-bias"], "fused", monkeypatch, n, quantization="nvfp4")
    assert llm.engine.model.model._fused.max_rows == 32
    _, reference = generate(checkpoints["qwen2-bias"], "torch", monkeypatch, n, quantization="nvfp4")
    assert_same(fused, reference, atol=2e-4)


def test_dense_batches_above_the_limit_take_the_torch_path(checkpoints, monkeypatch):
    monkeypatch.setattr("fp4serve.models.llama.FUSED_MAX_ROWS", {"nvfp4": 32, "dense": 2})
    llm, fused = generate(checkpoints["llama-tied"], "fused", monkeypatch, 3)
    assert llm.engine.model.model._fused.max_rows == 2
    _, reference = generate(checkpoints["llama-tied"], "torch", monkeypatch, 3)
    assert_same(fused, reference, atol=2e-4)


@pytest.mark.parametrize("name,why", [("qwen3-qknorm", "q/k norm"), ("qwen2-sliding", "sliding window")])
def test_unsupported_layers_stay_in_torch(checkpoints, monkeypatch, name, why, caplog):
    caplog.set_level("INFO", logger="fp4serve.models.llama")
    llm, _ = generate(checkpoints[name], "fused", monkeypatch, 2)
    assert llm.engine.model.model._fused.decoder is None
    assert why in caplog.text


def test_quantized_kv_cache_stays_in_torch(checkpoints, monkeypatch):
    llm, _ = generate(checkpoints["llama-tied"], "fused", monkeypatch, 1, kv_cache_dtype="fp8")
    assert llm.engine.model.model._fused.decoder is None


def test_forcing_the_torch_path(checkpoints, monkeypatch):
    llm, _ = generate(checkpoints["llama-tied"], "torch", monkeypatch, 1)
    assert llm.engine.model.model._fused.decoder is None


LEVELS = [level for level in cpu_build.LEVEL_CFLAGS if level != cpu_features().c_kernel_level]


@pytest.mark.parametrize("level", LEVELS)
def test_every_c_build_gives_the_same_step(checkpoints, monkeypatch, level, tmp_path):
    """The builds other CPUs run (AVX2, portable C, AVX-512 without bf16) on the same step."""
    if shutil.which("cc") is None or (level != "scalar" and not cpu_features().at_least(level)):
        pytest.skip(f"this CPU cannot run the {level} build")
    lib = cpu_build.build_library(cpu_build.kernel_cflags(level), cache=tmp_path)
    _, reference = generate(checkpoints["qwen2-bias"], "fused", monkeypatch, 3, quantization="nvfp4")
    original = cpu_decode.FusedDecoder.__init__

    def with_other_build(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "lib": lib})

    monkeypatch.setattr(cpu_decode.FusedDecoder, "__init__", with_other_build)
    llm, other = generate(checkpoints["qwen2-bias"], "fused", monkeypatch, 3, quantization="nvfp4")
    assert llm.engine.model.model._fused.decoder.lib is lib
    assert_same(other, reference, atol=2e-4)


def test_speculative_verification_rows_run_fused(checkpoints, monkeypatch):
    """n-gram verification steps (1 + k rows per sequence, each attending up to its own position)
    fit in the fused step and give the tokens of the per-layer path."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    calls = []
    original = cpu_decode.FusedDecoder.__call__
    monkeypatch.setattr(cpu_decode.FusedDecoder, "__call__", lambda self, x, *a: calls.append(len(x)) or original(self, x, *a))
    repetitive = [{"prompt_token_ids": [5, 6, 7, 8] * 6}]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for mode in ("fused", "torch"):
        monkeypatch.setenv(cpu_decode.ENV_VAR, mode)
        llm = LLM(str(checkpoints["qwen2-bias"]), dtype="float32", kv_cache_memory="4MiB", quantization="nvfp4",
                  speculative_config=spec)  # fmt: skip
        outs[mode] = llm.generate(repetitive, params)[0].outputs[0].token_ids
    assert any(n > 1 for n in calls), calls  # steps with drafts ran fused
    assert outs["fused"] == outs["torch"]


@pytest.mark.parametrize("quantization", [None, "nvfp4"])
def test_bf16_models_stay_within_bf16_rounding_of_the_torch_layers(checkpoints, monkeypatch, quantization):
    """bf16 models: the fused step keeps the residual in fp32 (and, with bf16 dot products,
    rounds projection inputs to bf16 as the per-layer path does), so it matches that path to
    bf16 precision, not bit for bit."""
    outs = {}
    for mode in ("fused", "torch"):
        monkeypatch.setenv(cpu_decode.ENV_VAR, mode)
        llm = LLM(str(checkpoints["llama-tied"]), dtype="bfloat16", kv_cache_memory="4MiB", quantization=quantization)
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0)
        out = llm.generate(prompts(2), params)
        outs[mode] = [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in out]
        assert (llm.engine.model.model._fused.decoder is None) == (mode == "torch")
    for (ids, logprobs), (ref_ids, ref_logprobs) in zip(outs["fused"], outs["torch"]):
        assert ids[:2] == ref_ids[:2]
        torch.testing.assert_close(torch.tensor(logprobs[:2]), torch.tensor(ref_logprobs[:2]), atol=0.05, rtol=0)
