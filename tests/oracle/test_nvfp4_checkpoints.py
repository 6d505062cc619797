"""NVFP4 checkpoints end to end against compressed-tensors (the PyPI package) as the format oracle.

For a tiny random Llama, Qwen3.5 dense and Qwen3.5 MoE model:
1. compressed-tensors' own helpers quantize every Linear into an `nvfp4-pack-quantized` checkpoint
   (generate_gparam, calculate_qparams, NVFP4PackedCompressor.compress; no llmcompressor);
2. compressed-tensors' decompression (unpack_fp4_from_uint8 + dequantize, in fp32) gives the dense
   weights those files stand for; fp4serve's logits on the NVFP4 files equal fp4serve's plain fp32
   logits on them; compressed-tensors' checkpoint dequantizer (entrypoints.convert, which computes
   in bf16) writes the bf16 weights our loader computes;
3. our ModelOpt writer rewrites the files; fp4serve's logits on them are identical, and
   compressed-tensors' ModelOpt-NVFP4 converter turns them back into the original files;
4. W4A4 emulation equals the plain model with compressed-tensors' fake-quantization of every
   quantized Linear's input (static input global scale, dynamic per-16 block scales).
"""
from __future__ import annotations

import json
import logging
import zlib

import pytest
import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.entrypoints.convert import (
    CompressedTensorsDequantizer,
    ModelOptNvfp4Converter,
    convert_checkpoint,
)
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize
from compressed_tensors.quantization.quant_scheme import NVFP4, NVFP4A16
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from compressed_tensors.utils.match import match_name
from conftest import llama_family_configs, make_checkpoint
from safetensors.torch import load_file, save_file
from test_qwen3_5 import _build as build_qwen3_5

from fp4serve.errors import CheckpointError
from fp4serve.formats.nvfp4_layouts import compressed_tensors_to_modelopt
from fp4serve.layers.linear import Linear, PlainLinearMethod
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod
from fp4serve.quantize.quality import load_for_eval, sequence_logits

ATOL = 1e-4
BLOCK = 16  # NVFP4 block
SCHEME = QuantizationScheme(targets=["Linear"], **NVFP4, format="nvfp4-pack-quantized")
# Weight-only: compressed-tensors' checkpoint dequantizer rejects input_global_scale tensors as
# "residual qparams", so the dequantization oracle runs on this variant of the same files.
SCHEME_A16 = QuantizationScheme(targets=["Linear"], **NVFP4A16, format="nvfp4-pack-quantized")
WEIGHT_ARGS, ACT_ARGS = SCHEME.weights, SCHEME.input_activations
# What llmcompressor's NVFP4 recipes leave in 16 bits for these families, plus one ordinary layer
# (so "ignored stays BF16" is tested on a module that would otherwise be quantized).
IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$", "re:.*in_proj_[ab]$",
          "re:model\\.layers\\.1\\.mlp\\.(shared_expert\\.)?down_proj$"]  # fmt: skip
FUSED_GROUPS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z")]


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and "embed_tokens" not in name and "norm" not in name


def input_amax(module: str) -> float:
    """A made-up calibrated activation amax, the same for every projection reading the same input."""
    parent = module.rsplit(".", 1)[0]
    return 2.0 + zlib.crc32(parent.encode()) % 1000 / 100.0


def ct_global_scale(module: str, tensors: dict, shared: bool) -> torch.Tensor:
    """compressed-tensors' weight global scale; with `shared`, the min over the fused group (what
    llmcompressor's update_fused_layer_weight_global_scales does)."""
    members = [module]
    if shared:
        parent, _, leaf = module.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf in group:
                members = [f"{parent}.{m}" for m in group if f"{parent}.{m}.weight" in tensors]
    scales = [generate_gparam(tensors[f"{m}.weight"].float().min(), tensors[f"{m}.weight"].float().max()) for m in members]
    return torch.stack(scales).min().reshape(1)


def ct_compress(src, dst, shared_fused_scale: bool, ignore=IGNORE, activations: bool = True) -> None:
    """Quantize `src` into a compressed-tensors nvfp4-pack-quantized checkpoint with CT's own code."""
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, tensor in tensors.items():
        module = name.rpartition(".")[0]
        if not is_linear_weight(name, tensor) or any(match_name(module, p) for p in ignore):
            out[name] = tensor
            continue
        weight = tensor.float()
        gs = ct_global_scale(module, tensors, shared_fused_scale)
        blocks = weight.unflatten(-1, (-1, BLOCK))
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), WEIGHT_ARGS, global_scale=gs)
        compressed = NVFP4PackedCompressor.compress(
            {"weight": weight, "weight_scale": scale, "weight_global_scale": gs}, SCHEME
        )
        out[f"{module}.weight_packed"] = compressed["weight_packed"]
        out[f"{module}.weight_scale"] = compressed["weight_scale"]
        out[f"{module}.weight_global_scale"] = gs
        if activations:
            amax = torch.tensor(input_amax(module))
            out[f"{module}.input_global_scale"] = generate_gparam(-amax, amax).reshape(1)
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    quant = QuantizationConfig(config_groups={"group_0": SCHEME if activations else SCHEME_A16}, ignore=list(ignore),
                               format="nvfp4-pack-quantized", quantization_status="compressed")  # fmt: skip
    config["quantization_config"] = quant.model_dump(mode="json")
    (dst / "config.json").write_text(json.dumps(config))
    for extra in src.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            (dst / extra.name).write_bytes(extra.read_bytes())


def ct_decompress_fp32(src, dst) -> None:
    """Every NVFP4 Linear decompressed by compressed-tensors' own functions, in fp32."""
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, tensor in tensors.items():
        module, _, param = name.rpartition(".")
        if param == "weight_packed":
            rows, half = tensor.shape
            codes = unpack_fp4_from_uint8(tensor, rows, half * 2, dtype=torch.float32)
            scale = tensors[f"{module}.weight_scale"].float()
            gs = tensors[f"{module}.weight_global_scale"]
            out[f"{module}.weight"] = dequantize(codes, scale, None, WEIGHT_ARGS, torch.float32, global_scale=gs)
        elif param not in ("weight_scale", "weight_global_scale"):
            out[name] = tensor
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    for extra in src.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            (dst / extra.name).write_bytes(extra.read_bytes())


def build(kind: str, path):
    if kind == "llama":
        make_checkpoint(path, llama_family_configs()["llama3-rope-untied"])
    else:
        build_qwen3_5(kind, path)


class Model:
    """fp4serve's model for a directory (fp32, CPU, quantization as the files say)."""

    def __init__(self, path, compute: str = "w4a16"):
        self.model = load_for_eval(path, torch.float32, compute=compute)

    def logits(self, tokens: list[int]) -> torch.Tensor:
        return sequence_logits(self.model, tokens)


PROMPT = torch.randint(0, 290, (40,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module", params=["llama", "dense", "moe"])
def checkpoints(request, tmp_path_factory):
    """(kind, root): root holds bf16/, ct/ (W4A4 files), ct_a16/ (weight-only), dequantized/
    (compressed-tensors' fp32 decompression of ct_a16), dequantized_bf16/ (its checkpoint
    dequantizer's output), modelopt/ (our rewrite of ct)."""
    root = tmp_path_factory.mktemp(request.param)
    build(request.param, root / "bf16")
    # Llama: every tensor its own global scale (fused shards differ); Qwen3.5: shared per fused group.
    shared = request.param != "llama"
    ct_compress(root / "bf16", root / "ct", shared)
    ct_compress(root / "bf16", root / "ct_a16", shared, activations=False)
    ct_decompress_fp32(root / "ct_a16", root / "dequantized")
    dequantizer = CompressedTensorsDequantizer(root / "ct_a16", dtype=torch.bfloat16)
    convert_checkpoint(root / "ct_a16", root / "dequantized_bf16", dequantizer, max_workers=1)
    compressed_tensors_to_modelopt(root / "ct", root / "modelopt")
    return request.param, root


def test_compressed_tensors_matches_its_dequantized_weights(checkpoints):
    _, root = checkpoints
    assert "quantization_config" not in json.loads((root / "dequantized" / "config.json").read_text())
    ours = Model(root / "ct").logits(PROMPT)
    assert torch.equal(ours, Model(root / "ct_a16").logits(PROMPT))  # input scales unused by W4A16
    reference = Model(root / "dequantized").logits(PROMPT)
    err = (ours - reference).abs().max().item()
    assert err < ATOL, f"max |logit diff| {err:.2e}"
    # and the quantization is not a no-op: the 16-bit model gives clearly different logits
    bf16 = Model(root / "bf16").logits(PROMPT)
    assert (bf16 - reference).abs().max().item() > 100 * ATOL


def test_checkpoint_dequantizer_writes_the_bf16_weights_we_compute(checkpoints):
    _, root = checkpoints
    theirs = load_file(str(root / "dequantized_bf16" / "model.safetensors"))
    model = Model(root / "ct").model
    checked = 0
    for prefix, layer in model.named_modules():
        if isinstance(layer, Linear) and isinstance(layer.method, NVFP4LinearMethod):
            for rows, names in zip(shard_rows(layer), shard_checkpoint_names(prefix, len(layer.output_sizes))):
                ours = layer.method.dequantized_weight(layer, rows, torch.float32)
                # compressed-tensors multiplies in bf16 (code * (scale / global)); we compute in fp32
                # and round once, so the two may differ by one bf16 step
                torch.testing.assert_close(theirs[names + ".weight"].float(), ours, rtol=2**-7, atol=0)
                checked += 1
    assert checked > 0


def shard_rows(layer):
    return [layer.shard_rows(i if len(layer.output_sizes) > 1 else None) for i in range(len(layer.output_sizes))]


def shard_checkpoint_names(prefix: str, num_shards: int) -> list[str]:
    if num_shards == 1:
        return [prefix]
    parent, _, leaf = prefix.rpartition(".")
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
             "in_proj_qkvz": ["in_proj_qkv", "in_proj_z"]}  # fmt: skip
    return [f"{parent}.{name}" for name in fused[leaf]]


def test_weights_stay_packed_and_ignored_modules_stay_16_bit(checkpoints):
    kind, root = checkpoints
    model = Model(root / "ct").model
    methods = {name: type(m.method) for name, m in model.named_modules() if isinstance(m, Linear)}
    mlp = "model.layers.1.mlp" + (".shared_expert" if kind == "moe" else "")
    assert methods[f"{mlp}.down_proj"] is PlainLinearMethod  # listed in IGNORE
    assert methods[f"{mlp}.gate_up_proj"] is NVFP4LinearMethod
    assert methods["model.layers.0.mlp.down_proj" if kind != "moe" else "model.layers.0.mlp.experts.0.down_proj"] is NVFP4LinearMethod  # fmt: skip
    if kind != "llama":
        assert methods["model.layers.0.linear_attn.in_proj_ba"] is PlainLinearMethod
        assert methods["model.layers.0.linear_attn.in_proj_qkvz"] is NVFP4LinearMethod
    if kind == "moe":
        assert methods["model.layers.0.mlp.gate"] is PlainLinearMethod
    quantized = [m for m in model.modules() if isinstance(m, Linear) and isinstance(m.method, NVFP4LinearMethod)]
    for layer in quantized:
        assert layer.weight_packed.dtype == torch.uint8 and not hasattr(layer, "weight")
        assert layer.weight_packed.shape == (layer.out_features, layer.in_features // 2)


def test_modelopt_rewrite_gives_identical_logits(checkpoints):
    _, root = checkpoints
    hf_quant = json.loads((root / "modelopt" / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "NVFP4" and "lm_head" in hf_quant["exclude_modules"]
    assert torch.equal(Model(root / "modelopt").logits(PROMPT), Model(root / "ct").logits(PROMPT))


def test_compressed_tensors_converter_turns_our_modelopt_files_back(checkpoints, tmp_path):
    _, root = checkpoints
    converter = ModelOptNvfp4Converter(ignore=IGNORE, targets=["Linear"])
    convert_checkpoint(root / "modelopt", tmp_path / "back", converter, max_workers=1)
    original = load_file(str(root / "ct" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original)
    for name, tensor in original.items():
        if name.endswith("global_scale"):
            # 1/(1/x) can move float32's last bit
            torch.testing.assert_close(back[name].reshape(()).float(), tensor.reshape(()).float(), rtol=2e-7, atol=0)
        else:
            assert back[name].dtype == tensor.dtype and torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name  # fmt: skip


def test_w4a4_emulation_matches_compressed_tensors_fake_quantization(checkpoints):
    _, root = checkpoints
    w4a4 = Model(root / "ct", compute="w4a4")
    ours = w4a4.logits(PROMPT)
    quantized = {n for n, m in w4a4.model.named_modules() if isinstance(m, Linear) and isinstance(m.method, NVFP4LinearMethod)}

    def fake_quantize_input(module, args):
        (x,) = args
        amax = torch.tensor(input_amax(module.prefix))
        gs = generate_gparam(-amax, amax).reshape(1)
        blocks = x.float().unflatten(-1, (-1, BLOCK))
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), ACT_ARGS, global_scale=gs)
        return (fake_quantize(x.float(), scale, None, ACT_ARGS, global_scale=gs).to(x.dtype),)

    reference = Model(root / "dequantized")
    for name, module in reference.model.named_modules():
        if name in quantized:
            module.register_forward_pre_hook(fake_quantize_input)
    expected = reference.logits(PROMPT)
    err = (ours - expected).abs().max().item()
    assert err < ATOL, f"max |logit diff| {err:.2e}"
    w4a16 = Model(root / "ct").logits(PROMPT)
    assert (w4a16 - expected).abs().max().item() > 100 * ATOL  # activation quantization really happened


def test_misnamed_ignore_entry_is_reported(tmp_path, caplog):
    build("llama", tmp_path / "bf16")
    ct_compress(tmp_path / "bf16", tmp_path / "ct", shared_fused_scale=True, ignore=["lm_head", "model.layers.9.mlp.down_proj"])
    with caplog.at_level(logging.WARNING):
        Model(tmp_path / "ct")
    assert "model.layers.9.mlp.down_proj" in caplog.text and "match no module of this checkpoint" in caplog.text


def test_partly_quantized_fused_group_is_an_error(tmp_path):
    build("llama", tmp_path / "bf16")
    ct_compress(tmp_path / "bf16", tmp_path / "ct", shared_fused_scale=True, ignore=["lm_head", "model.layers.0.self_attn.k_proj"])
    with pytest.raises(CheckpointError, match="some of the projections fused here"):
        Model(tmp_path / "ct")
