"""NVFP4 Linear method against plain torch: loading both layouts, fused shards with different scales,
AWQ pre-quant scales, W4A4 emulation, on-the-fly quantization, and the errors for bad tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp4serve.errors import CheckpointError, ConfigError
from fp4serve.formats.checkpoint import (
    COMPRESSED_TENSORS,
    DEFAULT_EXCLUDES,
    MODELOPT,
    ON_THE_FLY,
    QuantConfig,
    resolve_quantization,
)
from fp4serve.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from fp4serve.layers.linear import Linear, PlainLinearMethod, linear_methods
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod, fake_quantize_activations
from fp4serve.models.quantization import LinearMethodChooser, checkpoint_module_names


def make_layer(source, sizes, in_features=64, bias=False, **kw) -> Linear:
    return Linear(in_features, sizes, bias=bias, dtype=torch.float32, method=NVFP4LinearMethod(source, **kw), prefix="x.qkv_proj")  # fmt: skip


def load_modelopt(layer, weights, input_scales=None, pre_quant=None):
    """weights: one dense [rows, in] tensor per shard, each quantized with its own global scale."""
    shards = len(weights)
    for i, w in enumerate(weights):
        q = quantize_nvfp4(w)
        shard = i if shards > 1 else None
        layer.load("weight", q.packed, shard)
        layer.load("weight_scale", q.block_scale, shard)
        layer.load("weight_scale_2", q.global_scale, shard)
        if input_scales is not None:
            layer.load("input_scale", torch.tensor(input_scales[i]), shard)
        if pre_quant is not None:
            layer.load("pre_quant_scale", pre_quant[i], shard)
    layer.method.process_weights_after_loading(layer)


def test_fused_shards_with_different_global_scales_dequantize_exactly():
    torch.manual_seed(0)
    weights = [torch.randn(32, 64) * s for s in (0.01, 1.0, 30.0)]  # very different amax per shard
    layer = make_layer(MODELOPT, [32, 32, 32])
    load_modelopt(layer, weights)
    expected = torch.cat([dequantize_nvfp4(quantize_nvfp4(w)) for w in weights])
    assert torch.equal(layer.method.dequantized_weight(layer), expected)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ expected.T, rtol=1e-4, atol=1e-4)  # fp32 summation order


def test_compressed_tensors_global_scales_are_divisors():
    torch.manual_seed(1)
    w = torch.randn(48, 32)
    q = quantize_nvfp4(w)
    layer = Linear(32, 48, dtype=torch.float32, method=NVFP4LinearMethod(COMPRESSED_TENSORS, input_scales=True))
    layer.load("weight_packed", q.packed, None)
    layer.load("weight_scale", q.block_scale, None)
    layer.load("weight_global_scale", q.ct_global_scale.reshape(1), None)
    layer.load("input_global_scale", torch.tensor([448.0 * 6 / 4.0]), None)
    layer.method.process_weights_after_loading(layer)
    torch.testing.assert_close(layer.method.dequantized_weight(layer), dequantize_nvfp4(q), rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.input_global, torch.tensor([4.0 / (448 * 6)]))


def test_w4a4_quantizes_each_shard_input_with_its_own_scale():
    torch.manual_seed(2)
    weights = [torch.randn(16, 64), torch.randn(16, 64)]
    amax = [2.0, 50.0]
    layer = make_layer(MODELOPT, [16, 16], compute="w4a4", input_scales=True)
    load_modelopt(layer, weights, input_scales=[a / 2688 for a in amax])
    x = torch.randn(3, 64) * 3
    expected = torch.cat(
        [fake_quantize_activations(x, torch.tensor(a / 2688)) @ dequantize_nvfp4(quantize_nvfp4(w)).T for a, w in zip(amax, weights)],
        dim=-1,
    )  # fmt: skip
    assert len(layer.activation_groups) == 2
    torch.testing.assert_close(layer(x), expected)
    # equal scales fuse into one group again
    same = make_layer(MODELOPT, [16, 16], compute="w4a4", input_scales=True)
    load_modelopt(same, weights, input_scales=[1 / 2688, 1 / 2688])
    assert len(same.activation_groups) == 1


def test_activation_fake_quantization_is_the_codec_round_trip():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    g = torch.tensor(3.0 / 2688)
    expected = dequantize_nvfp4(quantize_nvfp4(x.float(), g)).to(torch.bfloat16)
    assert torch.equal(fake_quantize_activations(x, g), expected)
    # values on the FP4 grid of their block survive unchanged
    grid = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6] * 2)[None] * 0.25
    assert torch.equal(fake_quantize_activations(grid, None), grid)


def test_awq_pre_quant_scale_multiplies_the_input():
    torch.manual_seed(3)
    w = torch.randn(16, 32)
    pqs = torch.rand(32) + 0.5
    layer = Linear(32, 16, dtype=torch.float32, method=NVFP4LinearMethod(MODELOPT, pre_quant_scale=True))
    load_modelopt(layer, [w], pre_quant=[pqs])
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), (x * pqs) @ dequantize_nvfp4(quantize_nvfp4(w)).T, rtol=1e-4, atol=1e-4)


def test_on_the_fly_quantizes_the_fused_matrix_with_one_global_scale():
    torch.manual_seed(4)
    shards = [torch.randn(32, 64, dtype=torch.bfloat16) * s for s in (1.0, 4.0)]
    layer = Linear(64, [32, 32], bias=True, dtype=torch.bfloat16, method=NVFP4LinearMethod(ON_THE_FLY))
    layer.load("weight", shards[1], 1)
    assert hasattr(layer, "staging")  # waits for the other shard
    layer.load("weight", shards[0], 0)
    layer.load("bias", torch.ones(64, dtype=torch.bfloat16), None)
    layer.method.process_weights_after_loading(layer)
    assert not hasattr(layer, "staging")
    q = quantize_nvfp4(torch.cat(shards))
    assert torch.equal(layer.weight_packed, q.packed) and torch.equal(layer.weight_global, q.global_scale.repeat(2))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, dequantize_nvfp4(q, torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)))
    # 4-bit in memory: a quarter of bf16 plus the scales
    assert layer.method.weight_bytes(layer) == 64 * 32 + 64 * 4 + 2 * 4


@pytest.mark.parametrize(
    "name, tensor, message",
    [
        ("weight", torch.zeros(32, 32, dtype=torch.bfloat16), "expected torch.uint8"),
        ("weight", torch.zeros(32, 16, dtype=torch.uint8), r"expected torch.uint8 \(32, 32\)"),
        ("weight_scale", torch.zeros(32, 4, dtype=torch.float32), "float8_e4m3fn"),
        ("weight_scale_2", torch.tensor([1.0, 2.0]), "one number"),
        ("weight_scale_2", torch.tensor(0.0), "not a positive number"),
        ("weight_packed", torch.zeros(32, 32, dtype=torch.uint8), "unexpected tensor"),
    ],
)
def test_bad_tensors_are_named(name, tensor, message):
    layer = Linear(64, 32, dtype=torch.float32, method=NVFP4LinearMethod(MODELOPT), prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(CheckpointError, match=message):
        layer.load(name, tensor, None)


def test_in_features_must_be_a_multiple_of_16():
    with pytest.raises(CheckpointError, match="divisible by 16"):
        Linear(40, 16, method=NVFP4LinearMethod(MODELOPT), prefix="odd")


def test_checkpoint_module_names_undo_fusing_and_renaming():
    stacked = [("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2)]
    renames = [("model.language_model.", "model.")]
    names = checkpoint_module_names("model.layers.3.self_attn.qkv_proj", 3, stacked, renames)
    assert names[1] == ["model.layers.3.self_attn.k_proj", "model.language_model.layers.3.self_attn.k_proj"]
    assert checkpoint_module_names("lm_head", 1, stacked, renames) == [["lm_head"]]


def test_ignore_patterns_follow_each_layout():
    ct = QuantConfig(COMPRESSED_TENSORS, ignore=["lm_head", "re:.*mlp\\.gate$"])
    assert ct.ignored_by("model.layers.0.mlp.gate") and not ct.ignored_by("model.layers.0.mlp.gate_proj")
    assert ct.ignored_by("lm_head") and not ct.ignored_by("model.lm_head")  # exact names are exact
    modelopt = QuantConfig(MODELOPT, ignore=["*mlp.gate.*", "model.layers.3.linear_attn*"])
    assert modelopt.ignored_by("model.layers.0.mlp.gate")  # quantizer-path pattern still matches the module
    assert modelopt.ignored_by("model.layers.3.linear_attn.in_proj_qkv")
    assert not modelopt.ignored_by("model.layers.0.mlp.gate_proj")
    targeted = QuantConfig(COMPRESSED_TENSORS, targets=["re:.*mlp.*"])
    assert targeted.quantizes("model.layers.0.mlp.down_proj") and not targeted.quantizes("model.layers.0.self_attn.o_proj")


def test_on_the_fly_default_exclusions():
    quant = QuantConfig(ON_THE_FLY, ignore=list(DEFAULT_EXCLUDES))
    chooser = LinearMethodChooser(quant, [], [("model.language_model.", "model.")], "w4a16")
    with linear_methods(chooser):
        kept = {p: Linear(32, 16, prefix=p) for p in ("lm_head", "model.layers.0.mlp.gate", "model.layers.0.linear_attn.in_proj_a",
                                                       "model.layers.0.mlp.shared_expert_gate", "mtp.fc")}  # fmt: skip
        quantized = Linear(32, 16, prefix="model.layers.0.mlp.experts.3.down_proj")
    assert all(type(m.method) is PlainLinearMethod for m in kept.values())
    assert isinstance(quantized.method, NVFP4LinearMethod)


def test_quantization_flag_is_checked_against_the_files(tmp_path):
    modelopt = QuantConfig(MODELOPT)
    assert resolve_quantization(None, modelopt, tmp_path) is modelopt
    assert resolve_quantization("modelopt", modelopt, tmp_path) is modelopt
    with pytest.raises(ConfigError, match="is a modelopt checkpoint"):
        resolve_quantization("compressed-tensors", modelopt, tmp_path)
    with pytest.raises(ConfigError, match="already quantized"):
        resolve_quantization("nvfp4", modelopt, tmp_path)
    with pytest.raises(ConfigError, match="holds no quantized weights"):
        resolve_quantization("modelopt", None, tmp_path)
    assert resolve_quantization("nvfp4", None, tmp_path).method == ON_THE_FLY


@pytest.mark.parametrize("compute", ["w4a16", "w4a4"])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_apply_matches_the_plain_torch_reference(compute, rows):
    """The Linear's fast path (kernels/cpu_nvfp4.py) against dequantize-everything-then-matmul,
    with per-shard scales, bias and bf16 activations."""
    torch.manual_seed(5)
    layer = Linear(64, [32, 48], bias=True, dtype=torch.bfloat16, method=NVFP4LinearMethod(MODELOPT, compute, input_scales=True))
    load_modelopt(layer, [torch.randn(32, 64), torch.randn(48, 64) * 5], input_scales=[3 / 2688, 9 / 2688])
    layer.load("bias", torch.randn(80, dtype=torch.bfloat16), None)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    ours, reference = layer(x).float(), layer.method.reference_apply(layer, x).float()
    # same weights; only the fp32 summation order and the final bf16 rounding may differ
    torch.testing.assert_close(ours, reference, rtol=2**-7, atol=1e-2)
