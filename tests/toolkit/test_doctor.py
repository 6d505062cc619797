"""fp4serve doctor: each rule fires on a tiny checkpoint with that one defect planted, and a clean
checkpoint has no findings at all."""

from __future__ import annotations

import json
import os

import pytest
import toolkit_checkpoints
import torch
from safetensors.torch import load_file, save_file
from toolkit_checkpoints import edit_json, split_into_shards, write_ct_nvfp4

from fp4serve.cli import main
from fp4serve.formats.nvfp4 import from_ct_global_scale
from fp4serve.toolkit.doctor import run_doctor
from fp4serve.toolkit.graft_mtp import graft_mtp

copy_of = toolkit_checkpoints.copy_of  # the fixture

TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}<tool_call>{{ call.function.name }} {{ call.function.arguments | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def findings(path, **kwargs):
    return run_doctor(path, **kwargs)


def by_rule(path, rule, **kwargs):
    return [f for f in findings(path, **kwargs) if f.rule == rule]


def edit_tensors(path, edit, file="model.safetensors"):
    weights = load_file(str(path / file))
    edit(weights)
    save_file(weights, str(path / file), metadata={"format": "pt"})


def make_clean(copy_of, tmp_path):
    """NVFP4 (compressed-tensors) with the MTP head grafted, a tool-aware template, and a
    tokenizer_config that transformers 4.x also reads."""
    dense = copy_of("dense16")
    clean = tmp_path / "clean"
    write_ct_nvfp4(dense, clean, ignore=["lm_head", "re:.*in_proj_[ab]$"])
    graft_mtp(clean, dense)
    (clean / "chat_template.jinja").write_text(TOOL_TEMPLATE)

    def compat(c):
        c.pop("backend")
        c["additional_special_tokens"] = c.pop("extra_special_tokens")
        c["tokenizer_class"] = "PreTrainedTokenizerFast"

    edit_json(clean / "tokenizer_config.json", compat)
    return clean


def test_clean_checkpoint_has_no_findings(copy_of, tmp_path, capsys):
    clean = make_clean(copy_of, tmp_path)
    assert findings(clean) == []
    main_exit = run_main(["doctor", str(clean), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert main_exit == 0 and report["errors"] == 0 and report["findings"] == []


def run_main(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_files_rules(copy_of, tmp_path):
    lfs = copy_of("dense16", "lfs")
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 123\n")
    assert [f.severity for f in by_rule(lfs, "F01")] == ["error"]

    linked = copy_of("dense16", "linked")
    outside = tmp_path / "elsewhere.json"
    os.replace(linked / "tokenizer.json", outside)
    (linked / "tokenizer.json").symlink_to(outside)
    (f,) = by_rule(linked, "F02")
    assert "outside the model directory" in f.message and "tokenizer.json" in f.message

    truncated = copy_of("dense16", "truncated")
    file = truncated / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    (f,) = by_rule(truncated, "F03")
    assert "truncated" in f.message and f.severity == "error"

    sharded = copy_of("dense16", "sharded")
    split_into_shards(sharded, "model.layers.0.")

    def plant(index):
        weight_map = index["weight_map"]
        weight_map["model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors"
        del weight_map["model.norm.weight"]
        index["metadata"]["total_size"] += 1

    edit_json(sharded / "model.safetensors.index.json", plant)
    save_file({"x": torch.zeros(2)}, str(sharded / "stray.safetensors"))
    got = {f.rule: f for f in findings(sharded, check_values=False)}
    assert "model.layers.0.ghost.weight" in got["F05"].message and got["F05"].severity == "error"
    assert "model.norm.weight" in got["F06"].message
    assert "total_size" in got["F07"].message and "stray.safetensors" in got["F08"].message


def test_names_rules(copy_of):
    odd = copy_of("dense16", "odd")
    edit_tensors(odd, lambda w: (w.pop("model.norm.weight"), w.update({"model.unknown.weight": torch.ones(4)})))
    got = {f.rule: f for f in findings(odd, check_values=False)}
    assert "model.unknown.weight" in got["N02"].message and got["N02"].severity == "error"
    assert "model.norm.weight" in got["N03"].message


def test_quant_algo_vllm_cannot_load(copy_of):
    svd = copy_of("moe-modelopt", "svd")
    edit_json(svd / "hf_quant_config.json", lambda c: c["quantization"].update(quant_algo="NVFP4_SVD"))
    edit_json(svd / "config.json", lambda c: c["quantization_config"].update(quant_algo="NVFP4_SVD"))
    messages = [f.message for f in by_rule(svd, "Q01", check_values=False)]
    assert any("'NVFP4_SVD' is not one vLLM loads" in m for m in messages)
    assert any("fp4serve loads" in m for m in messages)


def test_quantized_module_tensors(copy_of):
    ct = copy_of("dense-ct")
    module = "model.layers.0.mlp.down_proj"

    def plant(w):
        del w[f"{module}.weight_global_scale"]
        w["model.layers.1.mlp.down_proj.weight_scale"] = w["model.layers.1.mlp.down_proj.weight_scale"].float()

    edit_tensors(ct, plant)
    got = {f.rule: f for f in findings(ct, check_values=False)}
    assert f"{module} (no weight_global_scale)" in got["Q02"].message
    assert "model.layers.1.mlp.down_proj: weight_scale is F32" in got["Q03"].message


def test_ignore_lists(copy_of, tmp_path):
    dense = copy_of("dense16")
    typo = copy_of("dense-ct", "typo")
    edit_json(
        typo / "config.json", lambda c: c["quantization_config"]["ignore"].append("model.layers.0.mlp.gate_projj")
    )
    assert "model.layers.0.mlp.gate_projj" in by_rule(typo, "Q04", check_values=False)[0].message

    write_ct_nvfp4(dense, tmp_path / "gdn-gates", ignore=["lm_head"])  # in_proj_a/b quantized too
    (f,) = by_rule(tmp_path / "gdn-gates", "Q05", check_values=False)
    assert f.severity == "warning" and "model.layers.0.linear_attn.in_proj_a" in f.message

    write_ct_nvfp4(dense, tmp_path / "split", ignore=["lm_head", "re:.*in_proj_[ab]$", "re:.*k_proj$"])
    (f,) = by_rule(tmp_path / "split", "Q07", check_values=False)
    assert "model.layers.3.self_attn.{q_proj,k_proj,v_proj}" in f.message and f.severity == "error"

    stale = copy_of("dense-ct", "stale")  # in_proj_a/b are 16-bit, but the ignore list no longer says so
    edit_json(stale / "config.json", lambda c: c["quantization_config"]["ignore"].remove("re:.*in_proj_[ab]$"))
    (f,) = by_rule(stale, "Q08", check_values=False)
    assert "stored 16-bit" in f.message and "model.layers.0.linear_attn.in_proj_a" in f.message


def test_fused_scales_report_the_error_of_taking_the_largest(copy_of, tmp_path):
    write_ct_nvfp4(copy_of("dense16"), tmp_path / "per-shard", shared=False)
    (f,) = by_rule(tmp_path / "per-shard", "Q06", check_values=False)
    weights = load_file(str(tmp_path / "per-shard" / "model.safetensors"))
    # vLLM keeps the largest compressed-tensors global scale (a divisor): shard i's weights are
    # scaled by g_used / g_i, a relative error of 1 - g_used / g_i (docs/toolkit.md)
    worst_group, worst = None, -1.0
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z")):
        for parent in {n.rsplit(".", 2)[0] for n in weights if n.endswith(f"{group[0]}.weight_packed")}:
            g = {m: from_ct_global_scale(weights[f"{parent}.{m}.weight_global_scale"]).item() for m in group}
            errors = {m: abs(min(g.values()) / g[m] - 1) for m in group}
            if max(errors.values()) > worst:
                worst_group, worst = (parent, errors), max(errors.values())
    parent, errors = worst_group
    assert f"worst {parent}" in f.message
    for m, e in errors.items():
        assert f"{m} {e:.1%}" in f.message


def test_mtp_rules(copy_of):
    no_layers = copy_of("dense16", "no-layers")
    edit_json(no_layers / "config.json", lambda c: c.pop("mtp_num_hidden_layers"))
    (f,) = by_rule(no_layers, "M01", check_values=False)
    assert f.severity == "error" and "no mtp_num_hidden_layers" in f.message

    exposed = copy_of("dense-ct", "exposed")
    graft_mtp(exposed, copy_of("dense16"))
    edit_json(exposed / "config.json", lambda c: c["quantization_config"]["ignore"].remove("re:^mtp\\..*"))
    (f,) = by_rule(exposed, "M02", check_values=False)
    assert "mtp.fc" in f.message and "re:^mtp\\\\..*" in f.fix
    assert not by_rule(exposed, "N02", check_values=False)  # reported once, as M02


def test_values_rules(copy_of):
    bad = copy_of("dense-ct", "bad-values")

    def plant(w):
        w["model.layers.0.mlp.down_proj.weight_scale"] = torch.zeros_like(
            w["model.layers.0.mlp.down_proj.weight_scale"]
        )
        norm = w["model.layers.1.input_layernorm.weight"].clone()
        norm[3] = float("nan")
        w["model.layers.1.input_layernorm.weight"] = norm

    edit_tensors(bad, plant)
    got = {f.rule: f for f in findings(bad)}
    assert "model.layers.1.input_layernorm.weight" in got["V01"].message and got["V01"].severity == "error"
    assert "model.layers.0.mlp.down_proj.weight_scale" in got["V02"].message
    assert "V01" not in {f.rule for f in findings(bad, check_values=False)}


def test_tokenizer_rules(copy_of):
    tok = copy_of("dense16", "tok")
    assert by_rule(tok, "T01", targets=("vllm",)) and not by_rule(tok, "T01", targets=("fp4serve",))
    (tok / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('tool messages unsupported') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    (f,) = by_rule(tok, "T02")
    assert f.severity == "error" and "tool messages unsupported" in f.message


def test_targets_and_exit_codes(copy_of, capsys):
    vl = copy_of("vl16")
    edit_tensors(vl, lambda w: w.update({k.replace("model.visual.", "model.language_model.visual."): w.pop(k)
                                         for k in [k for k in w if k.startswith("model.visual.")]}))  # fmt: skip
    assert run_main(["doctor", str(vl), "--for", "vllm", "--skip-values"]) == 1
    out = capsys.readouterr().out
    assert "error   N01" in out and "fix: fp4serve rename-tensors" in out
    assert run_main(["doctor", str(vl), "--for", "fp4serve", "--skip-values"]) == 0
    assert "warning N01" in capsys.readouterr().out  # no preprocessor_config.json: fp4serve serves text only
    (vl / "preprocessor_config.json").write_text('{"image_processor_type": "Qwen2VLImageProcessor"}')
    assert run_main(["doctor", str(vl), "--for", "fp4serve", "--skip-values"]) == 1
    assert "fp4serve refuses them (unless --language-model-only)" in capsys.readouterr().out
    assert run_main(["doctor", str(vl / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
