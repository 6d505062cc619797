"""strip-vision and rename-tensors: byte-checked round trips, loading in fp4serve, doctor before/after."""

from __future__ import annotations

import json

import pytest
import toolkit_checkpoints
import torch
from safetensors.torch import load_file, save_file
from toolkit_checkpoints import raw, split_into_shards, tensors

from fp4serve.cli import main
from fp4serve.errors import CheckpointError
from fp4serve.formats.safetensors_file import read_header
from fp4serve.quantize.quality import load_for_eval, sequence_logits
from fp4serve.toolkit.doctor import run_doctor
from fp4serve.toolkit.rename_tensors import rename_tensors
from fp4serve.toolkit.strip_vision import strip_vision

PROMPT = list(range(3, 40, 3))

copy_of = toolkit_checkpoints.copy_of  # the fixture


def rules(path, severity=None, **kwargs):
    return {f.rule for f in run_doctor(path, check_values=False, **kwargs) if severity in (None, f.severity)}


def misnest(path):
    """The defect of the documents: the vision tower written under model.language_model.visual."""
    weights = load_file(str(path / "model.safetensors"))
    moved = {k.replace("model.visual.", "model.language_model.visual.", 1): v for k, v in weights.items()}
    save_file(moved, str(path / "model.safetensors"), metadata={"format": "pt"})


def data_region(path) -> bytes:
    header = read_header(path)
    return path.read_bytes()[header.data_start :]


def test_strip_vision_keeps_the_text_model(copy_of):
    vl = copy_of("vl16")
    before = tensors(vl)
    logits = sequence_logits(load_for_eval(vl, torch.float32), PROMPT)
    report = strip_vision(vl)
    after = tensors(vl)
    vision = [n for n in before if n.startswith("model.visual.")]
    assert vision and sorted(report.removed) == sorted(vision)
    assert set(after) == set(before) - set(vision)
    assert all(raw(after[n]) == raw(before[n]) for n in after)
    config = json.loads((vl / "config.json").read_text())
    assert config["language_model_only"] is True
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"] and "vision_config" in config
    assert torch.equal(sequence_logits(load_for_eval(vl, torch.float32), PROMPT), logits)
    assert rules(vl, "error") == set()
    assert "N04" in rules(vl, "warning")  # vLLM must be told --language-model-only
    assert "N04" not in rules(vl, targets=("fp4serve",))


def test_strip_vision_of_a_quantized_sharded_checkpoint_drops_its_ignore_entries(copy_of, tmp_path):
    from toolkit_checkpoints import write_ct_nvfp4

    vl = copy_of("vl16")
    ignore = ["lm_head", "re:.*in_proj_[ab]$", "model.visual.blocks.0.attn.qkv", "model.visual.merger.linear_fc1"]
    write_ct_nvfp4(vl, tmp_path / "ct", ignore=ignore)
    ct = tmp_path / "ct"
    split_into_shards(ct, "model.visual.")  # the first shard holds only the vision tower
    before = tensors(ct)
    strip_vision(ct)
    index = json.loads((ct / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00002-of-00002.safetensors"}
    assert not (ct / "model-00001-of-00002.safetensors").exists()
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["ignore"] == ignore[:2]
    after = tensors(ct)
    assert all(raw(after[n]) == raw(before[n]) for n in after)
    assert rules(ct, "error") == set()
    load_for_eval(ct, torch.float32)


def test_rename_misnested_vision_is_header_only(copy_of):
    vl = copy_of("vl16")
    misnest(vl)
    file = vl / "model.safetensors"
    old_size, old_data, old_header = file.stat().st_size, data_region(file), read_header(file)
    assert "N01" in rules(vl, "error")
    assert rules(vl, "error", targets=("fp4serve",)) == set()  # fp4serve drops it either way: a warning
    dry = rename_tensors(vl, "model.language_model.visual.", "model.visual.", dry_run=True)
    assert len(dry.renames) == 21 and read_header(file).tensors == old_header.tensors
    report = rename_tensors(vl, "model.language_model.visual.", "model.visual.")
    new_header = read_header(file)
    assert file.stat().st_size == old_size and new_header.header_len == old_header.header_len  # padded in place
    assert data_region(file) == old_data
    for old, new in report.renames.items():
        a, b = old_header.tensors[old], new_header.tensors[new]
        assert (a.start, a.end, a.dtype, a.shape) == (b.start, b.end, b.dtype, b.shape)
    assert "padded to its old" in "\n".join(report.lines())
    assert "N01" not in rules(vl)
    load_for_eval(vl, torch.float32)


def test_rename_that_grows_the_header_rewrites_and_says_so(copy_of):
    vl = copy_of("vl16")
    file = vl / "model.safetensors"
    old_data, old_len = data_region(file), read_header(file).header_len
    report = rename_tensors(vl, "model.visual.", "model.language_model.visual.")
    assert read_header(file).header_len > old_len
    assert data_region(file) == old_data
    assert "so the file was rewritten" in "\n".join(report.lines())


def test_rename_updates_the_index_and_refuses_collisions(copy_of):
    vl = copy_of("vl16")
    split_into_shards(vl, "model.visual.")
    with pytest.raises(CheckpointError, match="would collide with 1 existing tensors: model.visual.merger.norm.bias"):
        rename_tensors(vl, "model.visual.merger.linear_fc1.bias", "model.visual.merger.norm.bias")
    with pytest.raises(CheckpointError, match="no tensor name .* starts with 'nothing.'"):
        rename_tensors(vl, "nothing.", "x.")
    rename_tensors(vl, "model.visual.", "model.language_model.visual.")
    index = json.loads((vl / "model.safetensors.index.json").read_text())
    assert not any(n.startswith("model.visual.") for n in index["weight_map"])
    assert "F05" not in rules(vl) and "F06" not in rules(vl)


def test_cli(copy_of, capsys):
    vl = copy_of("vl16")
    misnest(vl)
    main(["rename-tensors", str(vl), "--from", "model.language_model.visual.", "--to", "model.visual.", "--dry-run"])
    out = capsys.readouterr().out
    assert "model.language_model.visual.blocks.0.attn.qkv.weight -> model.visual.blocks.0.attn.qkv.weight" in out
    assert "21 tensors would be renamed (dry run: nothing changed)" in out
    main(["strip-vision", str(vl)])
    assert "removed 21 vision tensors" in capsys.readouterr().out
    main(["strip-vision", str(vl)])
    assert "nothing changed" in capsys.readouterr().out
