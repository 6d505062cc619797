"""`fp4serve quantize` and `fp4serve eval` on tiny checkpoints, with compressed-tensors as the oracle:
its own NVFP4 quantization of the unfused source weights gives the bytes we write, and its
decompression of our files gives the weights we compute. The outputs load in fp4serve and pass
doctor for dense, MoE and the ConditionalGeneration layout."""

from __future__ import annotations

import json
import random
import weakref

import pytest
import toolkit_checkpoints
import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.quant_scheme import NVFP4A16
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from conftest import llama_family_configs, make_checkpoint
from toolkit_checkpoints import tensors

from fp4serve.cli import main
from fp4serve.formats.checkpoint import detect_quantization
from fp4serve.formats.nvfp4 import NVFP4Tensor, dequantize_nvfp4, from_ct_global_scale
from fp4serve.quantize import source_model
from fp4serve.quantize.pipeline import QuantizeOptions, quantize_checkpoint
from fp4serve.quantize.quality import load_for_eval, sequence_logits
from fp4serve.quantize.recipes import Recipe
from fp4serve.toolkit.doctor.runner import run_doctor

SCHEME = QuantizationScheme(targets=["Linear"], **NVFP4A16, format="nvfp4-pack-quantized")
FUSED = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("in_proj_qkv", "in_proj_z"),
    ("in_proj_b", "in_proj_a"),
)
copy_of = toolkit_checkpoints.copy_of  # the fixture
TOKENS = [1, 5, 9, 33, 2, 7, 100, 250, 3, 8, 41, 17, 64, 90, 12, 6]


@pytest.fixture
def calib(tmp_path):
    """Calibration JSONL for the word tokenizer (tokens w0..w508)."""
    rng = random.Random(0)
    path = tmp_path / "calib.jsonl"
    lines = [json.dumps({"text": " ".join(f"w{rng.randrange(500)}" for _ in range(48))}) for _ in range(4)]
    lines.append(
        json.dumps({"messages": [{"role": "user", "content": "w1 w2 w3"}, {"role": "assistant", "content": "w4"}]})
    )
    path.write_text("\n".join(lines) + "\n")
    return path


def word_tokenizer(monkeypatch):
    """AutoTokenizer picks the Qwen3.5 tokenizer class for the MoE fixture by its model type, and that
    class drops our words; load the fixture's tokenizer.json as it is."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", PreTrainedTokenizerFast.from_pretrained)


def errors(path):
    return [f for f in run_doctor(path, ("vllm", "fp4serve")) if f.severity == "error"]


def fused_group(module: str, names) -> list[str]:
    parent, _, leaf = module.rpartition(".")
    for group in FUSED:
        if leaf in group:
            return [f"{parent}.{m}" for m in group if f"{parent}.{m}.weight" in names]
    return [module]


def ct_quantize(weight: torch.Tensor, global_scale: torch.Tensor) -> dict:
    blocks = weight.float().unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), SCHEME.weights, global_scale=global_scale)
    return NVFP4PackedCompressor.compress(
        {"weight": weight.float(), "weight_scale": scale, "weight_global_scale": global_scale}, SCHEME
    )


def check_against_compressed_tensors(src, out) -> int:
    """Every NVFP4 module: bytes equal compressed-tensors' quantization of the unfused weight with
    the group's global scale; when the group's scale is the module's own (its amax is the group's),
    that is compressed-tensors' default quantization of that weight alone. Returns that count."""
    source, ours = tensors(src), tensors(out)
    own_scale = 0
    for name in [n for n in ours if n.endswith(".weight_packed")]:
        module = name.removesuffix(".weight_packed")
        weight = source[f"{module}.weight"].float()
        group = fused_group(module, source)
        group_amax = max(source[f"{m}.weight"].float().abs().max() for m in group)
        gs = generate_gparam(-group_amax, group_amax)
        assert torch.equal(ours[f"{module}.weight_global_scale"], gs), module
        if weight.abs().max() == group_amax:
            gs_own = generate_gparam(weight.min(), weight.max())
            assert torch.equal(gs_own, gs)
            own_scale += 1
        expected = ct_quantize(weight, gs)
        assert torch.equal(ours[f"{module}.weight_packed"], expected["weight_packed"]), module
        assert torch.equal(ours[f"{module}.weight_scale"].view(torch.uint8), expected["weight_scale"].view(torch.uint8))
        # compressed-tensors' decompression is the dense weight our codec stands for
        ct_dense = dequantize(
            unpack_fp4_from_uint8(ours[name], *weight.shape, dtype=torch.float32),
            ours[f"{module}.weight_scale"].float(),
            global_scale=ours[f"{module}.weight_global_scale"],
            args=SCHEME.weights,
        )
        q = NVFP4Tensor(ours[name], ours[f"{module}.weight_scale"], from_ct_global_scale(gs))
        torch.testing.assert_close(ct_dense, dequantize_nvfp4(q), rtol=1e-6, atol=0)
    return own_scale


@pytest.mark.parametrize("family", ["dense16", "moe16"])
def test_max_bytes_equal_compressed_tensors(copy_of, tmp_path, family):
    src = copy_of(family)
    out = tmp_path / "out"
    quantize_checkpoint(src, out, QuantizeOptions(recipe=Recipe("xs")), progress=False)
    assert check_against_compressed_tensors(src, out) > 0
    assert errors(out) == []


def test_llama_bytes_and_logits(tmp_path):
    src = tmp_path / "llama"
    make_checkpoint(src, llama_family_configs()["llama3-rope-untied"])
    out = tmp_path / "llama-ct"
    quantize_checkpoint(src, out, QuantizeOptions(), progress=False)
    assert check_against_compressed_tensors(src, out) > 0
    assert errors(out) == []
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head"] and config["format"] == "nvfp4-pack-quantized"
    base = sequence_logits(load_for_eval(src, torch.float32), TOKENS)
    quant = sequence_logits(load_for_eval(out, torch.float32), TOKENS)
    assert 0 < (base - quant).abs().max() < 0.5 * base.abs().max()


def test_recipes_regular_and_xs(copy_of, tmp_path):
    src = copy_of("dense16")
    quantize_checkpoint(src, tmp_path / "regular", QuantizeOptions(), progress=False)
    quantize_checkpoint(src, tmp_path / "xs", QuantizeOptions(recipe=Recipe("xs")), progress=False)
    regular, xs = tensors(tmp_path / "regular"), tensors(tmp_path / "xs")
    gdn = [n for n in regular if ".linear_attn." in n]
    assert gdn and not any(n.endswith(".weight_packed") for n in gdn)
    for proj in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"):
        assert "model.layers.0.linear_attn." + proj + ".weight_packed" in xs
    # both keep these 16-bit, bit for bit
    for name in ("model.layers.0.linear_attn.conv1d.weight", "model.layers.0.linear_attn.A_log", "mtp.fc.weight",
                 "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight"):  # fmt: skip
        assert torch.equal(xs[name], tensors(src)[name]), name
    ignore = json.loads((tmp_path / "regular" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.linear_attn.in_proj_qkv" in ignore and "re:^mtp\\..*" in ignore
    for d in ("regular", "xs"):
        assert errors(tmp_path / d) == []
        load_for_eval(tmp_path / d, torch.float32)


def test_modelopt_moe_w4a4_awq_kv(copy_of, tmp_path, calib, monkeypatch):
    src = copy_of("moe16")
    word_tokenizer(monkeypatch)
    out = tmp_path / "moe-modelopt"
    options = QuantizeOptions(recipe=Recipe("xs"), fmt="modelopt", algorithm="awq-full", w4a4=True,
                              kv_cache="fp8", calib_data=str(calib))  # fmt: skip
    report = quantize_checkpoint(src, out, options, progress=False)
    assert report.samples == 5
    quant = detect_quantization(out)
    assert quant.method == "modelopt" and quant.has_input_scales and quant.kv_cache_algo == "FP8"
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4" and "model.layers.0.mlp.gate" in hf["exclude_modules"]
    ours = tensors(out)
    assert ours["model.layers.3.self_attn.k_proj.k_scale"] > 0
    assert ours["model.layers.0.mlp.experts.0.down_proj.input_scale"] > 0
    assert errors(out) == []
    model = load_for_eval(out, torch.float32)
    assert torch.isfinite(sequence_logits(model, TOKENS)).all()


def test_conditional_generation_strip_vision_and_mtp(copy_of, tmp_path):
    out = tmp_path / "vl-nvfp4"
    options = QuantizeOptions(fmt="modelopt", mtp_from=str(copy_of("dense16")), strip_vision=True)
    report = quantize_checkpoint(copy_of("vl16"), out, options, progress=False)
    names = tensors(out)
    assert any(n.startswith("model.language_model.layers.3.self_attn.q_proj.weight_scale_2") for n in names)
    assert not any(".visual." in n for n in names) and "mtp.fc.weight" in names
    assert any("grafted" in line for line in report.lines())
    assert json.loads((out / "config.json").read_text())["language_model_only"] is True
    assert errors(out) == []
    load_for_eval(out, torch.float32)


def test_conditional_generation_keeps_vision(copy_of, tmp_path):
    out = tmp_path / "vl-ct"
    quantize_checkpoint(copy_of("vl16"), out, QuantizeOptions(recipe=Recipe("xs")), progress=False)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "re:^model\\.visual\\..*" in ignore
    assert any(n.startswith("model.visual.") for n in tensors(out))
    assert errors(out) == []


def release(live: dict, nbytes: int) -> None:
    live["bytes"] -= nbytes


def test_memory_is_one_layer(tmp_path, monkeypatch):
    """Source tensors alive at any time stay within about one decoder layer (plus the embedding the
    calibration reads once), the same for 2 and 8 layers; built layers never overlap."""
    from transformers import LlamaConfig

    peaks = {}
    for layers in (2, 8):
        src = tmp_path / f"llama{layers}"
        config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
        make_checkpoint(src, config)
        live = {"bytes": 0, "peak": 0, "layers": 0, "max_layers": 0}
        read, build = source_model.SourceModel.read, source_model.SourceModel.build_layer

        def counting_read(self, names, read=read, live=live):
            out = read(self, names)
            for t in out.values():
                live["bytes"] += t.nbytes
                weakref.finalize(t, release, live, t.nbytes)
            live["peak"] = max(live["peak"], live["bytes"])
            return out

        def counting_build(self, index, raw, build=build, live=live):
            layer = build(self, index, raw)
            live["layers"] += 1
            live["max_layers"] = max(live["max_layers"], live["layers"])
            weakref.finalize(layer, lambda: live.__setitem__("layers", live["layers"] - 1))
            return layer

        monkeypatch.setattr(source_model.SourceModel, "read", counting_read)
        monkeypatch.setattr(source_model.SourceModel, "build_layer", counting_build)
        calib = tmp_path / "calib.jsonl"
        calib.write_text(json.dumps({"text": " ".join(f"w{i}" for i in range(64))}) + "\n")
        quantize_checkpoint(src, tmp_path / f"out{layers}", QuantizeOptions(algorithm="awq-lite", calib_data=str(calib)),
                            progress=False)  # fmt: skip
        monkeypatch.undo()
        layer_bytes = sum(t.nbytes for n, t in tensors(src).items() if n.startswith("model.layers.0."))
        embed_bytes = tensors(src)["model.embed_tokens.weight"].nbytes
        assert live["max_layers"] == 1
        assert live["peak"] <= max(layer_bytes, embed_bytes)
        peaks[layers] = live["peak"]
    assert peaks[2] == peaks[8]


def test_cli_errors_and_nothing_written(copy_of, tmp_path, capsys):
    ct = copy_of("dense-ct")
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(ct), str(tmp_path / "o")])
    assert e.value.code == 2
    assert "already quantized (compressed-tensors)" in capsys.readouterr().err
    src = copy_of("dense16")
    for args, message in [
        (["--recipe", "xs", "--exclude", "*linear_attn.in_proj_z"], "split a fused group"),
        (["--include", "*mlp.gate"], "the MoE router"),
        (["--calib-data", str(tmp_path / "missing.jsonl"), "--w4a4"], "no such file"),
        (["--mtp-from", str(ct)], "has no mtp.* tensors"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["quantize", str(src), str(tmp_path / "o"), "--no-progress", *args])
        assert e.value.code == 2
        assert message in capsys.readouterr().err, args
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dense-ct", "dense16"]


def test_eval_cli(copy_of, tmp_path, capsys):
    src = copy_of("dense16")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i * 7 % 500}" for i in range(40)))
    main(["quantize", str(src), str(tmp_path / "q"), "--no-progress", "--recipe", "xs"])
    capsys.readouterr()
    main(["eval", str(tmp_path / "q"), "--base", str(src), "--text", str(text), "--json", "--log-level", "WARNING"])
    figures = json.loads(capsys.readouterr().out)
    assert figures["tokens"] == 40 and 0 < figures["kl_mean"] < 1 and 0 < figures["top1_agreement"] <= 1
    assert figures["ppl_base"] > 1 and figures["ppl_quant"] > 1
    assert len(figures["worst_layers"]) == 4 and figures["final_hidden_error"] > 0
    main(["eval", str(src), "--base", str(src), "--text", str(text), "--json", "--log-level", "WARNING"])
    same = json.loads(capsys.readouterr().out)
    assert same["kl_mean"] < 1e-9 and same["top1_agreement"] == 1.0 and same["final_hidden_error"] == 0
