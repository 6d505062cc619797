"""The CPU W4A16 NVFP4 linear (kernels/cpu_nvfp4.py) against the reference
`x @ dequantize_nvfp4(...).to(x.dtype).T`, for each mechanism: the C kernel's decode path (few rows)
and its tiled path (many rows), the C builds of every lower CPU level, and the torch fallback.

Weights are random bytes and random finite e4m3 scales (every code, subnormal and maximal scales),
so no quantizer sits between the test and the format. The dequantized weights are checked bit for
bit (tiles directly; the decode path through one-hot activations, which read single weights out
exactly); products are checked against the reference within one rounding of the output dtype."""
from __future__ import annotations

import shutil

import pytest
import torch

from fp4serve.errors import CheckpointError
from fp4serve.formats.nvfp4 import NVFP4Tensor, dequantize_nvfp4, quantize_nvfp4
from fp4serve.kernels import cpu_build, cpu_nvfp4
from fp4serve.kernels.cpu_features import cpu_features
from fp4serve.kernels.cpu_nvfp4 import nvfp4_linear, nvfp4_linear_w4a4

DTYPES = [torch.bfloat16, torch.float32, torch.float16]
# One rounding of the output: a sum accumulated in fp32 in another order can round to the
# neighbouring value of the output dtype.
RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}

needs_kernel = pytest.mark.skipif(not cpu_nvfp4.kernel_available(), reason="no C compiler for the NVFP4 CPU kernel")


def random_weight(out_features: int, in_features: int, seed: int) -> NVFP4Tensor:
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, generator=gen)
    # Every finite e4m3 byte (0x7f and 0xff are NaN): zero, subnormal, up to +-448.
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    picks = torch.randint(0, len(finite), (out_features, in_features // 16), generator=gen)
    block_scale = finite[picks].view(torch.float8_e4m3fn)
    global_scale = torch.tensor(1e-3 * (1 + torch.rand((), generator=gen).item()), dtype=torch.float32)
    return NVFP4Tensor(packed, block_scale, global_scale)


def reference(x, w: NVFP4Tensor, bias=None):
    return torch.nn.functional.linear(x, dequantize_nvfp4(w, x.dtype), None if bias is None else bias.to(x.dtype))


def assert_close_to_reference(got, expected, x, w: NVFP4Tensor):
    """Elementwise: one rounding of the output dtype, plus twice the worst-case error of an fp32
    sum of K products (K * 2**-24 * sum |x w|), since both sides accumulate, in different orders."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    in_features = x.shape[-1]
    magnitude = x.double().abs() @ dequantize_nvfp4(w, x.dtype).double().abs().T
    bound = RTOL[expected.dtype] * expected.double().abs() + 2 * in_features * 2**-24 * magnitude
    error = (got.double() - expected.double()).abs()
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, worst excess {(error - bound).max().item():.3g}"


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Run a test with the C kernel, and with the kernel unavailable (torch fallback)."""
    if request.param == "kernel" and not cpu_nvfp4.kernel_available():
        pytest.skip("no C compiler for the NVFP4 CPU kernel")
    if request.param == "torch":
        monkeypatch.setattr(cpu_nvfp4, "kernel", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17, 32, 33])
@pytest.mark.parametrize("out_features,in_features", [(1, 16), (38, 48), (97, 592)])
def test_matches_reference(path, dtype, rows, out_features, in_features):
    w = random_weight(out_features, in_features, seed=rows + out_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
    assert_close_to_reference(nvfp4_linear(x, w.packed, w.block_scale, w.global_scale), reference(x, w), x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [2, 40])
def test_bias_3d_input_and_out_dtype(path, dtype, rows):
    w = random_weight(53, 64, seed=rows)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows // 2, 64, generator=gen).to(dtype)
    bias = torch.randn(53, generator=gen).to(dtype)
    got = nvfp4_linear(x, w.packed, w.block_scale, w.global_scale, bias=bias)
    assert got.shape == (2, rows // 2, 53)
    assert_close_to_reference(got, reference(x, w, bias), x, w)
    as_float = nvfp4_linear(x, w.packed, w.block_scale, w.global_scale, bias=bias, out_dtype=torch.float32)
    assert as_float.dtype == torch.float32
    # The fp32 output is the unrounded form of the same result.
    torch.testing.assert_close(as_float.to(dtype).float(), got.float(), rtol=RTOL[dtype], atol=1e-6)


def test_quantized_weight_and_several_tiles(path, monkeypatch):
    """A weight made by the codec, split into tiles of 64 rows with a partial last tile."""
    monkeypatch.setattr(cpu_nvfp4, "TILE_BYTES", 0)
    gen = torch.Generator().manual_seed(0)
    w = quantize_nvfp4(torch.randn(150, 96, generator=gen) * torch.logspace(-3, 1, 150)[:, None])
    for rows in (1, 5, 200):
        x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
        assert_close_to_reference(nvfp4_linear(x, w.packed, w.block_scale, w.global_scale), reference(x, w), x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 6, 40])
def test_one_global_scale_per_row(path, dtype, rows, monkeypatch):
    """A fused projection whose shards keep their own global scales (row_global [out]) equals the
    shards computed apart, each with its scalar scale; tiles of 64 rows cut across shards."""
    monkeypatch.setattr(cpu_nvfp4, "TILE_BYTES", 0)
    shards = [random_weight(size, 80, seed=size) for size in (48, 17, 30)]
    packed = torch.cat([s.packed for s in shards])
    block_scale = torch.cat([s.block_scale.view(torch.uint8) for s in shards]).view(torch.float8_e4m3fn)
    row_global = torch.cat([s.global_scale.expand(s.packed.shape[0]) for s in shards])
    x = torch.randn(rows, 80, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = nvfp4_linear(x, packed, block_scale, row_global)
    for shard, part in zip(shards, got.split([48, 17, 30], dim=-1)):
        assert_close_to_reference(part.contiguous(), reference(x, shard), x, shard)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiles_are_the_reference_weights(path, dtype):
    w = random_weight(29, 80, seed=3)
    expected = dequantize_nvfp4(w, dtype)
    if path == "torch":
        got = cpu_nvfp4._dequantize_rows_torch(w.packed, w.block_scale, w.global_scale, dtype)
    else:
        got = cpu_nvfp4._dequantize_rows_c(cpu_nvfp4.kernel(), w.packed, w.block_scale, w.global_scale, dtype)
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))  # bit for bit


def decoded_weights(lib, w: NVFP4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights the decode path multiplies with, read out through one-hot rows of x: each output
    is then a single product 1 * w, exact in fp32."""
    in_features = w.packed.shape[1] * 2
    eye = torch.eye(in_features, dtype=dtype)
    columns = [
        cpu_nvfp4._gemv(lib, eye[i : i + 16], w.packed, w.block_scale, w.global_scale, round_bf16=dtype == torch.bfloat16)
        for i in range(0, in_features, 16)
    ]
    return torch.cat(columns).T


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_path_uses_the_reference_weights(dtype):
    w = random_weight(45, 592, seed=7)  # 9 groups of 64 and a block of 16; 37 block scales
    got = decoded_weights(cpu_nvfp4.kernel(), w, dtype)
    assert torch.equal(got.to(dtype), dequantize_nvfp4(w, dtype)) and torch.equal(got, got.to(dtype).float())


LOWER_LEVELS = [level for level in cpu_build.LEVEL_CFLAGS if level != cpu_features().c_kernel_level]


@pytest.fixture(scope="module", params=LOWER_LEVELS)
def other_build(request, tmp_path_factory):
    """The C build of another CPU level: every level this CPU can run is built and tested here
    (an AVX-512 machine runs the AVX2 and portable code); the others skip."""
    level = request.param
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    if level != "scalar" and not cpu_features().at_least(level):
        pytest.skip(f"this CPU cannot run the {level} build ({cpu_features().describe()})")
    lib = cpu_build.build_library(cpu_build.kernel_cflags(level), cache=tmp_path_factory.mktemp("kernel"))
    assert lib.isa == level
    return lib


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(33, 208), (70, 576), (5, 16)])
def test_other_builds_match(other_build, dtype, shape):
    """The variants other machines compile (AVX2, portable C, AVX-512 without avx512_bf16) give the
    same weights, bit for bit, and the same products."""
    lib = other_build
    out_features, in_features = shape
    w = random_weight(out_features, in_features, seed=11)  # 208: 3 groups of 64 and one block of 16
    assert torch.equal(decoded_weights(lib, w, dtype).to(dtype), dequantize_nvfp4(w, dtype))
    tiles = cpu_nvfp4._dequantize_rows_c(lib, w.packed, w.block_scale, w.global_scale, dtype)
    assert torch.equal(tiles.view(torch.uint8), dequantize_nvfp4(w, dtype).view(torch.uint8))  # signed zeros too
    for rows in (1, 2, 3, 5, 8, 9, 32):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = cpu_nvfp4._gemv(lib, x, w.packed, w.block_scale, w.global_scale, round_bf16=dtype == torch.bfloat16)
        assert_close_to_reference(got.to(dtype), reference(x, w), x, w)


def test_kernel_follows_the_cpu_level():
    """The build loaded is the one of this process's CPU level (FP4SERVE_CPU_ISA lowers it)."""
    if not cpu_nvfp4.kernel_available():
        pytest.skip("no C compiler")
    assert cpu_nvfp4.kernel().isa == cpu_features().c_kernel_level


def test_empty_batch(path):
    w = random_weight(7, 32, seed=0)
    assert nvfp4_linear(torch.empty(0, 32), w.packed, w.block_scale, w.global_scale).shape == (0, 7)


def test_bad_inputs_raise_clear_errors():
    w = random_weight(8, 32, seed=0)
    with pytest.raises(ValueError, match="32 inputs"):
        nvfp4_linear(torch.randn(2, 48), w.packed, w.block_scale, w.global_scale)
    with pytest.raises(CheckpointError, match="packed weight must be uint8"):
        nvfp4_linear(torch.randn(2, 32), w.packed.float(), w.block_scale, w.global_scale)
    with pytest.raises(CheckpointError, match="multiple of 16 inputs, got 40"):
        nvfp4_linear(torch.randn(2, 40), torch.zeros(8, 20, dtype=torch.uint8), w.block_scale, w.global_scale)
    with pytest.raises(CheckpointError, match="block scale must be float8_e4m3fn"):
        nvfp4_linear(torch.randn(2, 32), w.packed, w.block_scale[:, :1], w.global_scale)
    with pytest.raises(CheckpointError, match="global scale must be a scalar or one per output row"):
        nvfp4_linear(torch.randn(2, 32), w.packed, w.block_scale, torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [3, 40])
def test_w4a4_matches_compressed_tensors_activation_quantization(dtype, rows):
    """Activations quantized per 16 by compressed-tensors (the format oracle) with the input global
    scale, then multiplied by the same weights."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(
        num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True, scale_dtype=torch.float8_e4m3fn
    )
    w = random_weight(24, 64, seed=rows)
    x = (torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
    input_scale = torch.tensor(2.0**-9)  # a power of two: both libraries' scale arithmetic is exact
    ct_gs = (1 / input_scale).reshape(1)
    blocks = x.float().unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=ct_gs)
    x_q = dequantize(quantize(x.float(), scale, None, args, global_scale=ct_gs), scale, None, args, torch.float32, ct_gs)
    expected = reference(x_q.to(dtype), w)
    got = nvfp4_linear_w4a4(x, w.packed, w.block_scale, w.global_scale, input_scale)
    assert_close_to_reference(got, expected, x_q.to(dtype), w)
