"""--max-model-len as vLLM reads it: 32k / 32K / -1 / auto, and the refusal of a length beyond the
model's max_position_embeddings unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (then a warning)."""

from __future__ import annotations

import logging

import pytest
from conftest import make_checkpoint

from fp4serve import LLM, SamplingParams
from fp4serve.cli import build_parser
from fp4serve.config import EngineConfig
from fp4serve.engine_args import engine_config
from fp4serve.errors import ConfigError
from fp4serve.max_model_len import AUTO, parse_max_model_len

POSITIONS = 128
# 2 layers x K and V x 2 heads x 16 dims x 4 bytes = 512 bytes per token: 512 tokens
ENGINE = {"dtype": "float32", "max_num_seqs": 1, "kv_cache_memory": "256KiB"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("llama-128")
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=POSITIONS)  # fmt: skip
    make_checkpoint(path, config)
    return str(path)


@pytest.mark.parametrize(
    "text, length",
    [("4096", 4096), (" 2048 ", 2048), ("32k", 32_000), ("25.6k", 25_600), ("32K", 32_768), ("1M", 2**20),
     ("1m", 10**6), ("2g", 2 * 10**9), ("-1", AUTO), ("auto", AUTO), ("AUTO", AUTO), (512, 512), (-1, AUTO)],
)  # fmt: skip
def test_vllm_values_parse(text, length):
    assert parse_max_model_len(text) == length
    assert EngineConfig(max_model_len=text).max_model_len == length


@pytest.mark.parametrize(
    "text, message",
    [("1.5K", "decimals are not allowed with binary suffixes like K; did you mean 1.5k?"),
     ("32 k", "give a number of tokens"), ("lots", "give a number of tokens"), ("0", "give a length >= 1"),
     ("-2", "give a length >= 1"), (True, "give a number of tokens")],
)  # fmt: skip
def test_bad_values_are_refused_by_name(text, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(max_model_len=text)


def test_the_flag_takes_human_readable_values():
    args = build_parser().parse_args(["serve", "some/dir", "--max-model-len", "32k"])
    assert engine_config(args).max_model_len == 32_000
    args = build_parser().parse_args(["generate", "--max-model-len", "auto"])
    assert engine_config(args).max_model_len == AUTO


def test_beyond_the_models_positions_is_refused_as_vllm(model, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    with pytest.raises(ConfigError) as e:
        LLM(model, max_model_len=256, **ENGINE)
    assert str(e.value).startswith(
        "User-specified max_model_len (256) is greater than the derived max_model_len "
        "(max_position_embeddings=128 or model_max_length=None in model's config.json). "
        "To allow overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. "
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with extreme caution."
    )
    assert LLM(model, max_model_len=POSITIONS, **ENGINE).engine.max_model_len == POSITIONS


def test_the_override_variable_allows_it_with_a_warning(model, monkeypatch, caplog):
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with caplog.at_level(logging.WARNING, logger="fp4serve.max_model_len"):
        llm = LLM(model, max_model_len=192, **ENGINE)
    assert llm.engine.max_model_len == 192
    [record] = caplog.records
    assert "User-specified max_model_len (192) is greater than the derived max_model_len" in record.getMessage()
    assert "must be used with extreme caution" in record.getMessage()
    [output] = llm.generate([[1] * 150], SamplingParams(temperature=0, max_tokens=8))
    assert len(output.outputs[0].token_ids) == 8  # positions past 128 run (RoPE computes any position)


def test_auto_is_the_models_length_or_what_the_cache_holds(model, caplog):
    assert LLM(model, max_model_len="auto", **ENGINE).engine.max_model_len == POSITIONS
    with caplog.at_level(logging.WARNING, logger="fp4serve.engine"):
        llm = LLM(model, max_model_len=-1, dtype="float32", max_num_seqs=1, kv_cache_memory="32KiB")
    # 32 KiB / 512 bytes = 64 tokens, fewer than the model's 128
    assert llm.engine.max_model_len == 64
    assert "--max-model-len auto: the KV cache holds 64 tokens, fewer than the model's 128; max_model_len is 64" in (
        caplog.text
    )
    with pytest.raises(ConfigError, match="fewer than max_model_len 128"):
        LLM(model, dtype="float32", max_num_seqs=1, kv_cache_memory="32KiB")  # the default does not shrink
