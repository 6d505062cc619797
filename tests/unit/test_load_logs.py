"""Start logs that tell the truth: the target's `mtp.*` drop line says when the MTP drafter loads the
head, and quantization ignore entries are warned about only when they name nothing in the checkpoint
(standard entries for the embedding, lm_head, MTP head or vision tower are not)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from spec_checkpoints import make_mtp_target

from fp4serve import LLM

ENGINE = {"dtype": "float32", "max_model_len": 64, "max_num_seqs": 2, "kv_cache_memory": "4MiB"}
VISUAL = "model.visual.blocks.0.attn.qkv.weight"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny Qwen3.5 with an MTP head and, as image-text exports have, a vision tower tensor."""
    path = tmp_path_factory.mktemp("mtp-target")
    make_mtp_target(path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[VISUAL] = torch.zeros(4, 4)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def mtp_drop_line(caplog) -> str:
    [line] = [r.getMessage() for r in caplog.records if "matching mtp.*" in r.getMessage()]
    return line


@pytest.mark.parametrize(
    "spec, reason",
    [
        ({"method": "mtp", "num_speculative_tokens": 2}, "MTP head: loaded by the MTP drafter"),
        (None, "MTP head: unused, no MTP drafting"),
        ({"method": "ngram", "num_speculative_tokens": 2}, "MTP head: unused, no MTP drafting"),
    ],
)
def test_the_mtp_drop_line_says_who_loads_the_head(target, caplog, spec, reason):
    with caplog.at_level(logging.INFO, logger="fp4serve.models.weights"):
        llm = LLM(str(target), speculative_config=spec, **ENGINE)
    line = mtp_drop_line(caplog)
    assert line.startswith("dropped ") and line.endswith(f"matching mtp.* ({reason})"), line
    assert (llm.engine.proposer is not None and spec["method"] == "mtp") == ("loaded by" in reason)


def quantized_copy(src, dst, exclude: list[str]):
    """A ModelOpt NVFP4 declaration whose exclusions cover every Linear (so plain weights load),
    plus the given entries."""
    shutil.copytree(src, dst)
    quant = {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["model.layers.*", *exclude]}
    (dst / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
    return dst


def test_standard_ignore_entries_are_not_warned_about(target, tmp_path, caplog):
    standard = ["lm_head", "model.embed_tokens", "mtp*", "model.visual*", "*linear_attn.conv1d"]
    path = quantized_copy(target, tmp_path / "q", [*standard, "model.layers.9.mlp.down_proj", "model.vision_tower*"])
    with caplog.at_level(logging.INFO, logger="fp4serve.models.quantization"):
        LLM(str(path), speculative_config={"method": "mtp", "num_speculative_tokens": 1}, **ENGINE)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # this model has 4 layers, and no vision_tower: those two entries name nothing
    assert warning == (
        "quantization ignore entries that match no module of this checkpoint (mis-named?): "
        "['model.layers.9.mlp.down_proj', 'model.vision_tower*']"
    )
    [note] = [r.getMessage() for r in caplog.records if "not quantizable Linears here" in r.getMessage()]
    for entry in standard[1:]:  # lm_head (untied here) is a Linear the entry kept in 16 bits
        assert repr(entry) in note
    assert "NVFP4 (modelopt, w4a16): 0 Linear layers quantized" in caplog.text
