"""The Triton NVFP4 GEMM/GEMV (kernels/triton_nvfp4.py) against plain torch: dequantize with
formats/nvfp4.py, then F.linear in x's dtype; and an NVFP4 Linear on the Triton path against its
reference_apply.

What is asserted. The kernel multiplies by exactly the reference's weights (same fp32 decode, same
cast to x's dtype), so it differs only in the order of the fp32 sums, bounded by
ORDER_RTOL * (|x| @ |W|^T) (K <= 272 terms of fp32 rounding 6e-8, with margin). A 16-bit output is
that fp32 sum rounded once, so it may in addition land one step of the output dtype away where the
two sums straddle a rounding boundary: every element is within that step + the order bound, and at
least MIN_EQUAL of them are bit-identical to the reference. Under the interpreter the fp32 difference
is at most 2.2e-7 * (|x| @ |W|^T) and bf16 outputs are all identical, fp16 ones 99.75%.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton

from fp4serve.errors import CheckpointError
from fp4serve.formats.checkpoint import MODELOPT
from fp4serve.formats.nvfp4 import NVFP4Tensor, dequantize_nvfp4, quantize_nvfp4
from fp4serve.kernels import triton_nvfp4
from fp4serve.kernels.triton_nvfp4 import _launch_config, nvfp4_linear_triton
from fp4serve.layers.linear import Linear
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod

# fp32 sums of K <= 272 terms in another order: ~sqrt(K) * 2^-24 = 1e-6 typically, 5x that as margin
ORDER_RTOL = 5e-6
MIN_EQUAL = 0.98


def _weights(n: int, k: int, per_row: bool, seed: int):
    """Quantized [n, k] weights; per_row: rows in four groups of very different amax, each group with
    its own global scale (a fused projection's shards), given as one scale per row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    if not per_row:
        q = quantize_nvfp4(w)
        return q.packed, q.block_scale, q.global_scale
    groups = [quantize_nvfp4(part * s) for part, s in zip(w.chunk(4), (0.01, 1.0, 30.0, 0.3))]
    g = torch.cat([q.global_scale.expand(q.packed.shape[0]) for q in groups])
    return torch.cat([q.packed for q in groups]), torch.cat([q.block_scale for q in groups]), g


def _dequantized(packed, block_scale, g):
    """The codec's fp32 weights; g a scalar, or one per row (each row then dequantized with its own)."""
    if g.numel() == 1:
        return dequantize_nvfp4(NVFP4Tensor(packed, block_scale, g))
    rows = zip(packed.split(1), block_scale.split(1), g)
    return torch.cat([dequantize_nvfp4(NVFP4Tensor(p, s, g_row)) for p, s, g_row in rows])


def assert_matches(y, x, w, ref, bias=None):
    """y vs ref as the module docstring states; x [rows, K], w the fp32 dequantized weights."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    out_dtype = ref.dtype
    y, ref, x, w = y.cpu().float(), ref.cpu().float(), x.cpu(), w.cpu()
    magnitude = x.float().abs() @ w.to(x.dtype).float().abs().T
    if bias is not None:
        magnitude += bias.cpu().float().abs()
    bound = ORDER_RTOL * magnitude
    diff = (y - ref).abs()
    if out_dtype != torch.float32:
        # one step of the output dtype at the larger of the two magnitudes
        big = torch.maximum(y.abs(), ref.abs()).to(out_dtype)
        bound += (torch.nextafter(big, torch.full_like(big, float("inf"))) - big).float()
    assert (diff <= bound).all(), (
        f"{(diff > bound).sum().item()} elements off, max excess {(diff - bound).max().item()}"
    )
    if out_dtype != torch.float32:
        assert (diff == 0).float().mean() >= MIN_EQUAL, f"only {(diff == 0).float().mean().item():.4f} bit-identical"


SHAPES = [(1, 48, 16), (1, 100, 272), (3, 256, 64), (16, 100, 272), (33, 48, 64), (64, 256, 16), (130, 100, 272)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_gemm_matches_reference(device, m, n, k, dtype):
    packed, block_scale, g = _weights(n, k, per_row=False, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = _dequantized(packed, block_scale, g)
    ref = F.linear(x, w.to(dtype))
    y = nvfp4_linear_triton(x.to(device), packed.to(device), block_scale.to(device), g.to(device))
    assert_matches(y, x, w, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 130])
def test_per_row_global_scale_bias_and_3d_input(device, m, dtype):
    """One global scale per output row (shards scaled 0.01 to 30), a bias, x of shape [2, m/2, K] or
    [1, 1, K] taken as a column slice of a wider tensor (row stride != K)."""
    n, k = 100, 64
    packed, block_scale, g = _weights(n, k, per_row=True, seed=m)
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(m, 2 * k, generator=gen).to(dtype)
    x = wide[:, :k].reshape(2, m // 2, k) if m > 1 else wide[:, :k].reshape(1, 1, k)
    bias = torch.randn(n, generator=gen).to(dtype)
    w = _dequantized(packed, block_scale, g)
    # on a contiguous copy: for a strided bf16 x, torch's CPU F.linear rounds x @ W^T to bf16 before
    # adding the bias (two roundings; a quarter of the elements then differ from the exact sum rounded
    # once, which the contiguous path and the kernel both give)
    ref = F.linear(x.contiguous(), w.to(dtype), bias)
    y = nvfp4_linear_triton(*(t.to(device) for t in (x, packed, block_scale, g, bias)))
    assert y.shape == (*x.shape[:-1], n)
    assert_matches(y.reshape(-1, n), x.reshape(-1, k), w, ref.reshape(-1, n), bias)


def test_split_k_sums_partials_with_bias_and_out_dtype(device):
    """A decode shape that splits K (the partial sums, bias and cast then run in torch), written as fp32."""
    m, n, k = 1, 100, 272
    config = _launch_config(m, n, k, torch.device("cpu"))
    assert config["split"] == 2, config
    packed, block_scale, g = _weights(n, k, per_row=True, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    y = nvfp4_linear_triton(*(t.to(device) for t in (x, packed, block_scale, g, bias)), out_dtype=torch.float32)
    w = _dequantized(packed, block_scale, g)
    ref = x.float() @ w.to(torch.bfloat16).float().T + bias.float()  # fp32 out: no 16-bit rounding at all
    assert_matches(y, x, w, ref, bias)


def test_tiles_fill_a_gpu_at_decode():
    """The heuristic's promises for real shapes: decode spreads over >= 4 programs per SM of a 132-SM GPU
    for N of 5120 and up without splitting K past the traffic cap; prefill never splits."""
    for n, k in [(5120, 5120), (17408, 5120), (5120, 17408)]:
        c = _launch_config(1, n, k, torch.device("cpu"))
        assert triton.cdiv(n, c["BLOCK_N"]) * c["split"] >= 4 * 132, (n, k, c)
    assert _launch_config(16, 5120, 5120, torch.device("cpu"))["split"] == 2  # capped by partial-sum traffic
    assert _launch_config(64, 5120, 5120, torch.device("cpu"))["split"] == 1
    assert _launch_config(2048, 5120, 5120, torch.device("cpu"))["split"] == 1


def test_argument_checks(device):
    packed, block_scale, g = (t.to(device) for t in _weights(32, 64, per_row=False, seed=0))
    with pytest.raises(ValueError, match="64 inputs"):
        nvfp4_linear_triton(torch.randn(2, 32, device=device), packed, block_scale, g)
    with pytest.raises(ValueError, match="64 inputs"):
        nvfp4_linear_triton(torch.ones(2, 64, dtype=torch.int32, device=device), packed, block_scale, g)
    with pytest.raises(CheckpointError, match="block scale"):
        nvfp4_linear_triton(torch.randn(2, 64, device=device), packed, block_scale.float(), g)
    with pytest.raises(CheckpointError, match="global scale"):
        nvfp4_linear_triton(torch.randn(2, 64, device=device), packed, block_scale, g.repeat(3))
    empty = nvfp4_linear_triton(torch.randn(0, 64, device=device), packed, block_scale, g)
    assert empty.shape == (0, 32)


def _fused_layer(dtype, device, compute="w4a16") -> Linear:
    """q/k/v-like shards with very different global scales (and input scales for w4a4), with a bias."""
    sizes, k = [32, 16, 48], 64
    method = NVFP4LinearMethod(MODELOPT, compute=compute, input_scales=compute == "w4a4")
    layer = Linear(k, sizes, bias=True, dtype=dtype, method=method, prefix="x.qkv_proj")
    gen = torch.Generator().manual_seed(7)
    for i, (rows, s) in enumerate(zip(sizes, (0.02, 1.0, 25.0))):
        q = quantize_nvfp4(torch.randn(rows, k, generator=gen) * s)
        layer.load("weight", q.packed, i)
        layer.load("weight_scale", q.block_scale, i)
        layer.load("weight_scale_2", q.global_scale, i)
        if compute == "w4a4":
            layer.load("input_scale", torch.tensor((2.0, 2.0, 9.0)[i] / 2688), i)
    layer.load("bias", torch.randn(sum(sizes), generator=gen).to(dtype), None)
    method.process_weights_after_loading(layer)
    return layer.to(device)


@pytest.mark.parametrize(
    ("dtype", "compute"), [(torch.float32, "w4a16"), (torch.bfloat16, "w4a16"), (torch.bfloat16, "w4a4")]
)
def test_layer_on_triton_matches_reference_apply(monkeypatch, device, dtype, compute):
    layer = _fused_layer(dtype, device, compute)
    assert len(set(layer.weight_global.tolist())) == 3
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return nvfp4_linear_triton(*args, **kwargs)

    monkeypatch.setattr(triton_nvfp4, "nvfp4_linear_triton", spy)
    monkeypatch.setenv("FP4SERVE_TRITON", "1")
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(8)).to(device, dtype)
    with torch.inference_mode():
        y = layer(x)
        ref = layer.method.reference_apply(layer, x)
    assert len(calls) == len(layer.activation_groups) == (2 if compute == "w4a4" else 1)
    w = layer.method.dequantized_weight(layer)
    for rows, shard in layer.activation_groups:
        x_in = layer.method.transform_input(layer, x, shard).reshape(-1, 64)
        width = rows.stop - rows.start
        assert_matches(
            y[..., rows].reshape(-1, width), x_in, w[rows], ref[..., rows].reshape(-1, width), layer.bias[rows]
        )


def test_cpu_path_never_imports_triton():
    """triton is an optional dependency: a CPU forward of an NVFP4 Linear (FP4SERVE_TRITON=auto) must not
    import it. In a fresh interpreter, since this test session has imported triton long ago."""
    code = (
        "import sys, torch\n"
        "from fp4serve.formats.checkpoint import ON_THE_FLY\n"
        "from fp4serve.layers.linear import Linear\n"
        "from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod\n"
        "layer = Linear(32, 16, dtype=torch.float32, method=NVFP4LinearMethod(ON_THE_FLY))\n"
        "layer.load('weight', torch.randn(16, 32), None)\n"
        "layer.method.process_weights_after_loading(layer)\n"
        "layer(torch.randn(2, 32))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FP4SERVE_TRITON"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
