"""The NVFP4 codec against compressed-tensors' own NVFP4 implementation (the PyPI package).

Oracle functions (compressed-tensors 0.20):
- block scales: `quantization.utils.helpers.calculate_qparams` with tensor_group args, group 16,
  fp8 scale dtype, given the per-block min/max and the global scale;
- codes: `quantization.lifecycle.forward.quantize` (scale, clamp to +-6, `cast_to_fp4`), packed by
  `compressors.nvfp4.helpers.pack_fp4_to_uint8`;
- decoding: `unpack_fp4_from_uint8` and `quantization.lifecycle.forward.dequantize`;
- default global scale: `quantization.utils.helpers.generate_gparam`.

compressed-tensors' global scale is the reciprocal of ours (ModelOpt's), and it stores 0.125 where
we store 1.0 for a block whose scale is zero in FP8; the comparisons map those two conventions
explicitly and everything else must match bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4serve.formats.nvfp4 import (
    E2M1_VALUES,
    NVFP4Tensor,
    dequantize_nvfp4,
    from_ct_global_scale,
    pack_fp4,
    quantize_nvfp4,
    to_ct_global_scale,
    unpack_fp4,
)

CT_ARGS = QuantizationArgs(
    num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True, scale_dtype=torch.float8_e4m3fn
)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
# A block with amax 6 units (so its scale is exactly one unit), the midpoints, their negatives, zero;
# round half to even gives 0, 1, 1, 2, 2, 4, 4 (codes 0, 2, 2, 4, 4, 6, 6).
TIE_ROW = torch.tensor([6.0] + TIES + [-t for t in TIES] + [0.0])
TIE_ROW_CODES = [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0]


def ct_quantize(x: torch.Tensor, ct_global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' NVFP4 compression of x [..., K]: (packed uint8, fp8 block scales)."""
    gs = ct_global_scale.reshape(1)
    blocks = x.float().unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), CT_ARGS, global_scale=gs)
    fp4_values = quantize(x, scale, None, CT_ARGS, global_scale=gs)
    packed = pack_fp4_to_uint8(fp4_values.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return packed, scale.to(torch.float8_e4m3fn)


def ct_dequantize(t: NVFP4Tensor) -> torch.Tensor:
    rows, half_k = t.packed.reshape(-1, t.packed.shape[-1]).shape
    values = unpack_fp4_from_uint8(t.packed.reshape(rows, half_k), rows, 2 * half_k, dtype=torch.float32)
    scale = t.block_scale.float().reshape(rows, -1)
    return dequantize(values, scale, None, CT_ARGS, torch.float32, t.ct_global_scale.reshape(1)).reshape(t.shape)


def fp8_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def assert_matches_ct(x: torch.Tensor, t: NVFP4Tensor, exact_ties: bool = True) -> None:
    """Bit-exact packed bytes and block scales against compressed-tensors given the same global
    scale, except that a block whose scale is zero in FP8 is 1.0 here and 0.125 there.

    With exact_ties=False, codes may also differ by one step where x / (block_scale * g) is a grid
    midpoint to within float32 rounding: we compute x / (s * g) as ModelOpt does, compressed-tensors
    x / (s / (1/g)), and when g is not a power of two the last-bit difference breaks exact ties
    (common with bf16 weights) differently."""
    ct_packed, ct_scale = ct_quantize(x, t.ct_global_scale)
    assert t.packed.dtype == torch.uint8 and t.packed.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert t.block_scale.dtype == torch.float8_e4m3fn and t.block_scale.shape == (*x.shape[:-1], x.shape[-1] // 16)

    block_amax = x.float().unflatten(-1, (-1, 16)).abs().amax(-1)
    zero_scale = (block_amax / 6 / t.global_scale).to(torch.float8_e4m3fn).float() == 0
    assert (t.block_scale.float()[zero_scale] == 1.0).all()
    assert (ct_scale.float()[zero_scale] == 0.125).all()
    assert torch.equal(fp8_bytes(t.block_scale)[~zero_scale], fp8_bytes(ct_scale)[~zero_scale])

    if exact_ties:
        assert torch.equal(t.packed, ct_packed), f"{(t.packed != ct_packed).sum()} packed bytes differ"
        return
    ours, theirs = unpack_fp4(t.packed), unpack_fp4(ct_packed)
    differ = ours != theirs
    unit = (t.block_scale.double() * t.global_scale.double()).repeat_interleave(16, dim=-1)
    scaled = (x.double() / unit).abs()[differ]
    nearest_midpoint = torch.tensor(TIES, dtype=torch.float64)[(scaled[:, None] - torch.tensor(TIES)).abs().argmin(1)]
    assert ((scaled - nearest_midpoint).abs() <= 4 * 2**-24 * nearest_midpoint).all(), "a non-tie differs"
    assert ((ours[differ] & 8) == (theirs[differ] & 8)).all()
    assert (((ours[differ] & 7).int() - (theirs[differ] & 7).int()).abs() == 1).all()
    assert differ.float().mean() < 2e-3


def awkward_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows of very different magnitudes with exact zeros, plus (K >= 64): an all-zero
    block, a block with a subnormal FP8 scale, one whose scale underflows FP8 next to large ones, and
    a block of exact grid ties. The amax is 2.625 = 2688 * 2**-10, so the default global scale is
    exactly 2**-10 and the ties stay ties whichever way the scales are multiplied out."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=gen))
    x *= 2.5 / x.abs().max()
    x[torch.rand(shape, generator=gen) < 0.05] = 0.0
    flat = x.reshape(-1, shape[-1])
    flat[0, :16] = 0.0
    flat[0, 16] = 2.625
    flat[-1, 32:48] = torch.randn(16, generator=gen) * 2**-17  # scale ~2**-9: subnormal FP8
    if flat.shape[0] > 1:
        flat[1, :16] = torch.linspace(-1, 1, 16) * 2**-20  # scale ~2**-12.6: zero in FP8
    flat[0, -16:] = TIE_ROW * 0.75 * 2**-10
    return flat.reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (33, 256), (3, 5, 64), (2, 3, 1, 128)])
def test_matches_compressed_tensors(shape, dtype):
    x = awkward_tensor(shape, dtype, seed=sum(shape))
    t = quantize_nvfp4(x)
    assert t.global_scale.dtype == torch.float32 and t.global_scale.dim() == 0
    assert t.global_scale.item() == 2**-10
    assert_matches_ct(x, t)
    codes = unpack_fp4(t.packed).reshape(-1, shape[-1])
    scales = t.block_scale.float().reshape(-1, shape[-1] // 16)
    assert codes[0, -16:].tolist() == TIE_ROW_CODES
    assert scales[0, 0] == 1.0 and (codes[0, :16] == 0).all()
    assert 0 < scales[-1, 2] < 2**-6, "expected a subnormal fp8 block scale"
    if codes.shape[0] > 1:
        assert scales[1, 0] == 1.0 and (codes[1, :16] & 7 == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_weight_matches_compressed_tensors(dtype, seed):
    # Default (non-power-of-two) global scale: only float32-rounding ties may differ.
    x = torch.randn(640, 1024, generator=torch.Generator().manual_seed(seed)).to(dtype)
    assert_matches_ct(x, quantize_nvfp4(x), exact_ties=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_round_half_to_even(dtype):
    # Power-of-two global scale and an FP8 block scale: every product below is exact in all three
    # dtypes, so x / (block_scale * g) lands exactly on the midpoint.
    g = 2.0**-5
    for scale in [1.0, 0.375, 3.25, 2.0**-8]:  # the last one is a subnormal fp8
        x = (TIE_ROW * scale * g).to(dtype)[None]
        t = quantize_nvfp4(x, global_scale=g)
        assert t.block_scale.float().item() == scale
        assert unpack_fp4(t.packed)[0].tolist() == TIE_ROW_CODES
        assert_matches_ct(x, t)


def test_saturation_and_signed_zero():
    g = 1.0
    # amax / 6 = 1.0625 rounds (half to even) to the fp8 scale 1.0, so 6.375 saturates to 6.
    x = torch.tensor([[6.375, -6.375, 6.2, 0.1, -0.1, -0.0, 0.0] + [0.0] * 9])
    t = quantize_nvfp4(x, global_scale=g)
    assert t.block_scale.float().item() == 1.0
    # -0.1 rounds to zero but keeps its sign (code 8); -0.0 is not negative (code 0), as in both libraries.
    assert unpack_fp4(t.packed)[0, :7].tolist() == [7, 15, 7, 0, 8, 0, 0]
    assert_matches_ct(x, t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_supplied_global_scale_too_small_saturates_block_scales(dtype):
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 100).to(dtype)
    g = x.float().abs().max() / (6 * 448) / 50
    t = quantize_nvfp4(x, global_scale=g)
    assert (t.block_scale.float() == 448).all(), "block scales must clamp at 448, not become NaN"
    assert (unpack_fp4(t.packed) & 7 == 7).any()
    assert_matches_ct(x, t)


def test_all_zero_tensor():
    x = torch.zeros(3, 32, dtype=torch.bfloat16)
    t = quantize_nvfp4(x)
    assert t.global_scale.item() == 1.0
    # compressed-tensors falls back to the same global scale for an all-zero tensor.
    assert generate_gparam(x.float().min(), x.float().max()).item() == 1.0
    assert (t.packed == 0).all() and (t.block_scale.float() == 1.0).all()
    out = dequantize_nvfp4(t, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and (out == 0).all()
    assert_matches_ct(x, t)


def test_global_scale_conventions():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 7
    t = quantize_nvfp4(x)
    ct_default = generate_gparam(x.min(), x.max())  # compressed-tensors' own 2688 / amax
    torch.testing.assert_close(t.ct_global_scale.reshape(1), ct_default, rtol=2**-22, atol=0)
    assert t.ct_global_scale.dtype == torch.float32
    torch.testing.assert_close(from_ct_global_scale(to_ct_global_scale(t.global_scale)), t.global_scale)
    loaded = NVFP4Tensor.from_compressed_tensors(t.packed, t.block_scale, t.ct_global_scale)
    torch.testing.assert_close(dequantize_nvfp4(loaded), dequantize_nvfp4(t), rtol=2**-22, atol=0)


def test_pack_unpack_against_compressed_tensors():
    codes = torch.randint(0, 16, (6, 40), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (6, 20) and packed.dtype == torch.uint8
    assert torch.equal(packed, pack_fp4_to_uint8(E2M1_VALUES[codes.long()]))
    assert torch.equal(unpack_fp4(packed), codes)
    assert torch.equal(unpack_fp4_from_uint8(packed, 6, 40, dtype=torch.float32), E2M1_VALUES[codes.long()])
    # First element in the low nibble: [0.5, -6] -> codes [1, 15] -> byte 0xF1.
    first_pair = torch.tensor([[0.5, -6.0]])
    assert pack_fp4_to_uint8(first_pair).item() == 0xF1
    assert pack_fp4(torch.tensor([[1, 15]], dtype=torch.uint8)).item() == 0xF1
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        pack_fp4(torch.zeros(2, 3, dtype=torch.uint8))


def test_e2m1_table():
    assert E2M1_VALUES[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert torch.equal(E2M1_VALUES[8:], -E2M1_VALUES[:8])
    assert torch.signbit(E2M1_VALUES[8:]).all()


def assert_error_bound(x: torch.Tensor, t: NVFP4Tensor) -> None:
    """|x - dq| <= half the grid step around |x| / unit, times unit = block_scale * g; beyond
    6 units the value saturates to exactly 6 units."""
    xb = x.float().unflatten(-1, (-1, 16))
    unit = (t.block_scale.float() * t.global_scale).unsqueeze(-1)
    dq = dequantize_nvfp4(t, torch.float32).unflatten(-1, (-1, 16))
    m = xb.abs() / unit
    half_step = torch.where(m <= 2, 0.25, torch.where(m <= 4, 0.5, 1.0))
    bound = torch.where(m <= 6, half_step * unit, xb.abs() - 6 * unit)
    err = (xb - dq).abs()
    assert (err <= bound * (1 + 2**-20) + 1e-30).all(), f"max excess {(err - bound).max()}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize(dtype):
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(5)).to(dtype)
    t = quantize_nvfp4(x)
    out = dequantize_nvfp4(t, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    assert_error_bound(x, t)
    dq = dequantize_nvfp4(t)
    torch.testing.assert_close(dq, ct_dequantize(t), rtol=2**-22, atol=0)
    rel_rms = ((dq - x.float()).pow(2).mean() / x.float().pow(2).mean()).sqrt()
    assert 0.05 < rel_rms < 0.12  # ~0.09 for Gaussian weights
    awkward = awkward_tensor((5, 3, 64), dtype, seed=6)
    assert_error_bound(awkward, quantize_nvfp4(awkward))


@pytest.mark.parametrize("shape", [(4, 24), (16, 8), (3, 2, 33), (15,)])
def test_last_dim_not_multiple_of_16(shape):
    with pytest.raises(ValueError, match=r"multiple of 16.*" + r"\(" + ", ".join(map(str, shape))):
        quantize_nvfp4(torch.ones(shape))


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nvfp4(torch.tensor([[float("nan")] + [1.0] * 15]))
    with pytest.raises(ValueError, match="positive"):
        quantize_nvfp4(torch.ones(1, 16), global_scale=0.0)


# Hypothesis: blocks drawn around an FP8 block scale (any positive finite FP8 byte) with a
# power-of-two global scale, so that x / (block_scale * g) is exact in float32 whichever way it is
# computed (ModelOpt multiplies by g, compressed-tensors divides by 1/g) and ties stay ties.
multipliers = st.one_of(
    st.sampled_from([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 6.5, 7.0]).flatmap(
        lambda m: st.sampled_from([m, -m])
    ),
    st.floats(-7.0, 7.0, width=32),
)


@settings(max_examples=60, deadline=None)
@given(
    g_exp=st.integers(-12, 2),
    scale_bytes=st.lists(st.integers(1, 0x7E), min_size=1, max_size=4),
    data=st.data(),
)
def test_hypothesis_matches_compressed_tensors(g_exp, scale_bytes, data):
    g = 2.0**g_exp
    scales = torch.tensor(scale_bytes, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    m = torch.tensor(data.draw(st.lists(multipliers, min_size=16 * len(scale_bytes), max_size=16 * len(scale_bytes))))
    x = (m.reshape(-1, 16) * scales[:, None] * g).reshape(1, -1)
    t = quantize_nvfp4(x, global_scale=g)
    assert_matches_ct(x, t)
    assert_error_bound(x, t)
    assert torch.equal(pack_fp4(unpack_fp4(t.packed)), t.packed)
