"""graft-mtp: the head arrives bit-identical, nothing else changes, the result loads and passes doctor."""

from __future__ import annotations

import json

import pytest
import toolkit_checkpoints
import torch
from toolkit_checkpoints import edit_json, raw, tensors

from fp4serve.cli import main
from fp4serve.errors import CheckpointError
from fp4serve.models.mtp import Qwen3_5MTP
from fp4serve.quantize.quality import load_for_eval
from fp4serve.toolkit.doctor import run_doctor
from fp4serve.toolkit.graft_mtp import graft_mtp

copy_of = toolkit_checkpoints.copy_of  # the fixture


def errors(path, **kwargs):
    return [f for f in run_doctor(path, **kwargs) if f.severity == "error"]


def test_graft_into_compressed_tensors_single_file(copy_of):
    base, target = copy_of("dense16"), copy_of("dense-ct")
    before = tensors(target)
    assert not any(n.startswith("mtp.") for n in before)
    report = graft_mtp(target, base)
    after, base_tensors = tensors(target), tensors(base)
    mtp = sorted(n for n in base_tensors if n.startswith("mtp."))
    assert report.grafted == mtp and len(mtp) == 15  # the dense head: docs/reference.md section 5
    for name in mtp:
        assert after[name].dtype == base_tensors[name].dtype and raw(after[name]) == raw(base_tensors[name]), name
    for name, t in before.items():
        assert raw(after[name]) == raw(t), name
    assert set(after) == set(before) | set(mtp)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert {index["weight_map"][n] for n in mtp} == {"model-mtp.safetensors"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in after.values())
    config = json.loads((target / "config.json").read_text())
    assert config["mtp_num_hidden_layers"] == 1
    assert "re:^mtp\\..*" in config["quantization_config"]["ignore"]
    assert errors(target) == []
    model = load_for_eval(target, torch.float32)  # the quantized target loads, mtp.* dropped by name
    head = Qwen3_5MTP.load(model, target)
    assert torch.equal(head.mtp.fc.weight.float(), base_tensors["mtp.fc.weight"].float())


def test_graft_into_modelopt_updates_both_exclusion_lists(copy_of):
    base, target = copy_of("moe16"), copy_of("moe-modelopt")
    graft_mtp(target, base)
    hf_quant = json.loads((target / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((target / "config.json").read_text())["quantization_config"]
    assert "mtp.*" in hf_quant["exclude_modules"] and "mtp.*" in config["ignore"]
    assert errors(target, check_values=False) == []
    head = Qwen3_5MTP.load(load_for_eval(target, torch.float32), target)
    assert head.mtp.layers[0].mlp.experts[0] is not None


def test_graft_to_out_leaves_the_source_alone(copy_of, tmp_path):
    base, target = copy_of("dense16"), copy_of("dense-ct")
    listing = sorted(p.name for p in target.iterdir())
    graft_mtp(target, base, out=tmp_path / "grafted")
    assert sorted(p.name for p in target.iterdir()) == listing
    assert "model-mtp.safetensors" in {p.name for p in (tmp_path / "grafted").iterdir()}


def test_refusals(copy_of):
    base, target = copy_of("dense16"), copy_of("dense-ct")
    with pytest.raises(CheckpointError, match="has no mtp.. tensors"):
        graft_mtp(target, copy_of("dense-ct", "no-head"))
    edit_json(base / "config.json", lambda c: c.update(vocab_size=1024))
    with pytest.raises(CheckpointError, match="vocab_size is 1024 in the base"):
        graft_mtp(target, base)
    edit_json(base / "config.json", lambda c: c.update(vocab_size=512))
    graft_mtp(target, base)
    with pytest.raises(CheckpointError, match="already has 15 mtp.. tensors.*--force"):
        graft_mtp(target, base)
    graft_mtp(target, base, force=True)
    assert sum(n.startswith("mtp.") for n in tensors(target)) == 15


def test_failure_midway_leaves_the_checkpoint_untouched(copy_of, monkeypatch):
    base, target = copy_of("dense16"), copy_of("dense-ct")
    snapshot = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fp4serve.toolkit.graft_mtp.index_for", fail)
    with pytest.raises(OSError, match="disk full"):
        graft_mtp(target, base)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == snapshot
    assert [p.name for p in target.parent.iterdir() if "fp4serve-staging" in p.name] == []


def test_cli(copy_of, capsys):
    base, target = copy_of("dense16"), copy_of("dense-ct")
    main(["graft-mtp", str(target), "--from", str(base)])
    assert "grafted 15 mtp.* tensors into model-mtp.safetensors" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["graft-mtp", str(target), "--from", str(base)])
    assert exit_info.value.code != 0
    assert "already has 15 mtp.* tensors" in capsys.readouterr().err
