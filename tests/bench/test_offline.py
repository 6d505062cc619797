"""`fp4serve bench offline` on a tiny random Llama: every request generates exactly its length."""

from __future__ import annotations

import json

import pytest
from conftest import make_checkpoint
from transformers import LlamaConfig

from fp4serve.bench.offline import parse_range
from fp4serve.cli import main
from fp4serve.errors import BenchError


def test_offline_counts_what_the_engine_generated(tmp_path, capsys):
    model = tmp_path / "tiny"
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    make_checkpoint(model, config)
    out = tmp_path / "out"
    main(["bench", "offline", str(model), "--dtype", "float32", "--num-prompts", "5", "--input-len", "4:20",
          "--output-len", "3:9", "--out", str(out)])  # fmt: skip
    result = json.loads((out / "offline.json").read_text())["result"]
    assert result["requests"] == 5
    assert result["output_tokens"] == result["requested_output_tokens"]  # ignore_eos: nobody stops early
    assert 15 <= result["output_tokens"] <= 45 and 20 <= result["input_tokens"] <= 100
    assert result["output_tok_s"] == pytest.approx(result["output_tokens"] / result["seconds"])
    assert "output tok/s" in capsys.readouterr().out


def test_parse_range():
    assert parse_range("16:256") == (16, 256) and parse_range("7") == (7, 7)
    for bad in ("0:4", "9:3", "a:b"):
        with pytest.raises(BenchError):
            parse_range(bad)
