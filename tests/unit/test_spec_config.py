"""--speculative-config validation: vLLM's JSON shape, clear errors at start."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from fp4serve.errors import ConfigError
from fp4serve.spec_decode.config import parse_speculative_config

TARGET = SimpleNamespace(hidden_size=64, num_hidden_layers=4, mtp_num_hidden_layers=1, vocab_size=32)


def parse(raw, path=None, target=TARGET):
    return parse_speculative_config(raw, path, target)


def test_off_and_ngram_defaults():
    assert parse(None) is None and parse({}) is None
    c = parse({"method": "ngram", "num_speculative_tokens": 4})
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 4, 5, 5)
    c = parse({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (3, 3)
    c = parse({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (2, 5)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"method": "eagle"}, "unknown method 'eagle'"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "> prompt_lookup_max"),
        ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown keys ['lookahead']"),
        ({"method": "dflash"}, "needs \"model\""),
    ],
)
def test_errors(raw, message):
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert message in str(e.value)


def test_mtp_needs_the_head_tensors(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="needs the checkpoint's mtp.\\* tensors"):
        parse({"method": "qwen3_5_mtp"}, tmp_path)
    with pytest.raises(ConfigError, match="MTP head"):
        parse({"method": "mtp"}, tmp_path, SimpleNamespace(hidden_size=64, num_hidden_layers=4))
    save_file({"mtp.fc.weight": torch.zeros(2, 4)}, str(tmp_path / "model.safetensors"))
    c = parse({"method": "qwen3_next_mtp", "num_speculative_tokens": 3}, tmp_path)
    assert (c.method, c.num_speculative_tokens, c.model) == ("mtp", 3, tmp_path)
    assert parse({"method": "mtp"}, tmp_path).num_speculative_tokens == 1


def _drafter(path, **overrides):
    config = {"architectures": ["DFlashDraftModel"], "hidden_size": 64, "num_target_layers": 4, "block_size": 8,
              "dflash_config": {"mask_token_id": 3, "target_layer_ids": [1, 2]}}  # fmt: skip
    config.update(overrides)
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return {"method": "dflash", "model": str(path)}


def test_dflash_checks_the_drafter_fits_the_target(tmp_path):
    c = parse(_drafter(tmp_path / "ok"))
    assert (c.method, c.num_speculative_tokens) == ("dflash", 7)
    for overrides, message in [
        ({"hidden_size": 32}, "hidden size 32 does not fit the target's 64"),
        ({"num_target_layers": 64}, "trained for a 64-layer target; this one has 4"),
        ({"dflash_config": {"mask_token_id": 3, "target_layer_ids": [1, 4]}}, "outside the target's 4 layers"),
        ({"architectures": ["Qwen3ForCausalLM"]}, "is not a DFlash drafter"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse(_drafter(tmp_path / "bad", **overrides))
    with pytest.raises(ConfigError, match="exceeds block_size - 1 = 7"):
        parse({**_drafter(tmp_path / "ok"), "num_speculative_tokens": 8})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        parse({"method": "dflash", "model": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="DFlash drafter '.*missing' is not a directory"):
        parse({"method": "dflash", "model": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="model must be a string"):
        parse({"method": "dflash", "model": 7})
