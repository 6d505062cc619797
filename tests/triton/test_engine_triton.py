"""The whole engine on the Triton kernels (FP4SERVE_TRITON=1; on CPU under the interpreter), against
the same engine on the torch/C paths: tiny Llama (NVFP4 weights, plain/fp8/nvfp4 KV) and Qwen3.5
hybrid checkpoints written by transformers, several requests at once, chunked prefill, n-gram
speculative decoding (verification rows), and the captured-decode protocol (FP4SERVE_CPU_GRAPH_REPLAY=1:
static buffers, bucket padding) that CUDA graphs replay on a GPU."""
from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import make_checkpoint

from fp4serve import LLM, SamplingParams

pytest.importorskip("triton")

PROMPTS = [
    {"prompt_token_ids": [5, 17, 42, 8, 99, 3, 250, 11, 64, 7, 123, 31, 200, 9, 77, 150, 2, 48, 91, 33, 18]},
    {"prompt_token_ids": [7, 7, 21, 9, 7, 7, 21, 9, 7, 7, 21]},  # repeats: n-gram drafts get accepted
    {"prompt_token_ids": [100, 3]},
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, ignore_eos=True)
ENGINE = {"dtype": "float32", "kv_cache_memory": "2MiB", "max_model_len": 96, "max_num_seqs": 4}


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton-llama")
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )  # fmt: skip
    make_checkpoint(path, config, seed=4)
    return path


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton-qwen3_5")
    text = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "layer_types": ["linear_attention", "full_attention"], "max_position_embeddings": 128}  # fmt: skip
    make_checkpoint(path, transformers.Qwen3_5TextConfig(**text), seed=5)
    return path


def run(monkeypatch, path, triton: bool, replay: bool = False, params: SamplingParams = GREEDY, **engine):
    monkeypatch.setenv("FP4SERVE_TRITON", "1" if triton else "0")
    if replay:
        monkeypatch.setenv("FP4SERVE_CPU_GRAPH_REPLAY", "1")
    else:
        monkeypatch.delenv("FP4SERVE_CPU_GRAPH_REPLAY", raising=False)
    llm = LLM(str(path), **{**ENGINE, **engine})
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    return llm, [o.token_ids for o in outs], [[lp.logprob for lp in o.logprobs] for o in outs]


def assert_same(expected, got):
    assert got[0] == expected[0]
    for a, b in zip(expected[1], got[1]):
        assert b == pytest.approx(a, abs=1e-4)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "nvfp4"])
def test_llama_nvfp4_on_triton_kernels(monkeypatch, llama_path, kv_cache_dtype):
    engine = {"quantization": "nvfp4", "kv_cache_dtype": kv_cache_dtype, "max_num_batched_tokens": 16}
    _, *reference = run(monkeypatch, llama_path, triton=False, **engine)
    _, *kernels = run(monkeypatch, llama_path, triton=True, **engine)
    assert_same(reference, kernels)


def test_qwen3_5_hybrid_on_triton_kernels_with_drafts(monkeypatch, qwen_path):
    engine = {"max_num_batched_tokens": 16, "kv_cache_dtype": "fp8"}
    _, *reference = run(monkeypatch, qwen_path, triton=False, **engine)
    _, *kernels = run(monkeypatch, qwen_path, triton=True, **engine)
    assert_same(reference, kernels)
    longer = SamplingParams(temperature=0.0, max_tokens=16, logprobs=0, ignore_eos=True)
    _, *reference = run(monkeypatch, qwen_path, triton=False, params=longer, **engine)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    llm, *drafted = run(monkeypatch, qwen_path, triton=True, params=longer, speculative_config=spec, **engine)
    assert drafted[0] == reference[0]  # greedy verification is lossless
    assert llm.engine.spec_stats.num_draft_tokens > 0  # verification rows (and GDN rollback) really ran


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_captured_decode_protocol(monkeypatch, caplog, llama_path, qwen_path, which):
    """Three sequences decode in the bucket of 4: the padding row must touch no cache a real
    sequence reads, and every row's output must be its own."""
    path = llama_path if which == "llama" else qwen_path
    _, *reference = run(monkeypatch, path, triton=False)
    with caplog.at_level(logging.INFO, logger="fp4serve.engine.decode_graphs"):
        llm, *replayed = run(monkeypatch, path, triton=True, replay=True, cuda_graph_sizes="1,2,4")
    assert "decode graphs: captured batch sizes 1,2,4" in caplog.text
    assert llm.engine.runner.graphs is not None
    assert_same(reference, replayed)


def test_enforce_eager_captures_nothing(monkeypatch, llama_path):
    llm, *_ = run(monkeypatch, llama_path, triton=True, replay=True, enforce_eager=True)
    assert llm.engine.runner.graphs is None


def test_no_triton_on_cpu_by_default(monkeypatch, llama_path):
    monkeypatch.delenv("FP4SERVE_TRITON", raising=False)
    from fp4serve.kernels.triton_support import triton_reason

    assert triton_reason(torch.device("cpu")) == (False, "cpu tensors take the CPU kernels")
