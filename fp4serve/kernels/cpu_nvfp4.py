"""W4A16 NVFP4 linear on CPU without materializing the dequantized weight matrix.

`nvfp4_linear(x, packed, block_scale, global_scale)` computes the reference
`x @ dequantize_nvfp4(...).to(x.dtype).T` from the packed codes and FP8 block scales as stored
(4.5 bits per weight; nothing is re-laid out or precomputed at load). Mechanisms:

- A small C kernel, compiled on first use with the system C compiler for the CPU level
  (kernels/cpu_features.py: AVX-512 with avx512_bf16 where the CPU has it, AVX-512, AVX2 + FMA +
  F16C, or portable C) and cached under $FP4SERVE_CACHE/kernels. Up to `GEMV_MAX_ROWS` rows of x
  (decode), it streams each weight row once and decodes the codes in registers, then multiplies
  them into fp32 accumulators. AVX-512: 64 codes at a time, a 32-entry word permute gives their
  bf16 E2M1 values, one multiply applies the block scales; bf16 x uses `vdpbf16ps` (32 products
  per instruction). AVX2: 64 codes at a time, `pshufb` gives twice their E2M1 values as int8
  (all integers), converted to fp32 and scaled; the row sum is halved at the end (exact).
  Decode reads 4.5 instead of 16 bits per weight, which is what a decode step is bound by. For
  more rows (prefill) it dequantizes tiles of weight rows into a reused bf16 buffer that F.linear
  (oneDNN) multiplies: the GEMM dominates there and the dequantization is amortized.
- Without a C compiler (or off CPU): the same tiling, dequantizing with torch ops through a
  256-entry table that decodes one byte (two codes) per lookup.

Numerics: each weight is computed exactly as in `dequantize_nvfp4`, fp32
``e2m1(code) * (fp32(block_scale) * global_scale)`` rounded to x's dtype (round to nearest even),
so every path multiplies with the reference's dequantized weights, bit for bit; results differ only
in the fp32 accumulation order and the final rounding (tests/unit/test_cpu_nvfp4.py). Known
departures: `vdpbf16ps` and the bf16 conversions treat fp32 subnormals as zero (weights below
1e-38, or such activations).
"""
from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from fp4serve.errors import CheckpointError
from fp4serve.formats.nvfp4 import BLOCK_SIZE, E2M1_VALUES, E4M3_BYTE_VALUES, dequantize_nvfp4, quantize_nvfp4
from fp4serve.kernels.cpu_build import cpu_library

log = logging.getLogger(__name__)

# Up to this many rows of x the C kernel decodes the weights in registers; above it dequantized
# tiles through oneDNN's GEMM are faster (measured with benchmarks/nvfp4_linear.py: the two meet
# between 32 and 64 rows).
GEMV_MAX_ROWS = 32
# Weight rows per dequantized tile: about TILE_BYTES of bf16 so the tile stays in L2 while the
# GEMM reads it, and at least TILE_ROWS (64 rows of a 5632-wide matrix are 720 KB).
TILE_ROWS = 64
TILE_BYTES = 512 * 1024


# Byte -> its two codes' fp32 values packed in one int64 (first element in the low half, as on
# little-endian memory), so one index_select decodes two weights: the torch path's table.
_BYTE = torch.arange(256, dtype=torch.int32)
_E2M1_PAIRS = torch.stack((E2M1_VALUES[_BYTE & 15], E2M1_VALUES[_BYTE >> 4]), dim=-1).view(torch.int64).flatten()


def kernel() -> ctypes.CDLL | None:
    """This CPU's kernel library, or None (no C compiler: the torch path runs)."""
    return cpu_library()


def kernel_available() -> bool:
    return kernel() is not None


def _check_weight(packed: Tensor, block_scale: Tensor, global_scale: Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise CheckpointError(f"NVFP4 packed weight must be uint8 [out, in/2], got {packed.dtype} {tuple(packed.shape)}")
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    if in_features == 0 or in_features % BLOCK_SIZE:
        raise CheckpointError(f"NVFP4 weight needs a positive multiple of {BLOCK_SIZE} inputs, got {in_features}")
    if block_scale.dtype != torch.float8_e4m3fn or tuple(block_scale.shape) != (out_features, in_features // BLOCK_SIZE):
        raise CheckpointError(
            f"NVFP4 block scale must be float8_e4m3fn {(out_features, in_features // BLOCK_SIZE)} for a packed weight "
            f"of shape {tuple(packed.shape)}, got {block_scale.dtype} {tuple(block_scale.shape)}"
        )
    if global_scale.numel() != 1 and tuple(global_scale.shape) != (out_features,):
        raise CheckpointError(
            f"NVFP4 global scale must be a scalar or one per output row ({out_features}), got shape {tuple(global_scale.shape)}"
        )


def _tile_rows(in_features: int) -> int:
    return max(TILE_ROWS, TILE_BYTES // (2 * in_features) // 16 * 16)


def _dequantize_rows_torch(packed: Tensor, block_scale: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows of W (the reference's arithmetic), two codes per table lookup; g: fp32 scalar, [1] or
    one per row."""
    rows, in_features = packed.shape[0], packed.shape[1] * 2
    pairs = torch.index_select(_E2M1_PAIRS.to(packed.device), 0, packed.reshape(-1).to(torch.int32))
    w = pairs.view(torch.float32).view(rows, in_features // BLOCK_SIZE, BLOCK_SIZE)
    g = g.to(device=packed.device, dtype=torch.float32).reshape(-1, 1)  # [1 or rows, 1]
    w.mul_((block_scale.float() * g).unsqueeze(-1))
    return w.view(rows, in_features).to(dtype)


def nvfp4_linear(
    x: Tensor,
    packed: Tensor,
    block_scale: Tensor,
    global_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """y = x @ W^T (+ bias) with W = dequantize_nvfp4(packed, block_scale, global_scale) in x's
    dtype. x: [..., in]; packed uint8 [out, in/2]; block_scale float8_e4m3fn [out, in/16];
    global_scale fp32 (ModelOpt's weight_scale_2, a multiplier): a scalar, or one per output row
    (fused projections whose shards keep their own scales). Returns [..., out] in out_dtype
    (default x.dtype)."""
    _check_weight(packed, block_scale, global_scale)
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    if x.shape[-1] != in_features or not x.is_floating_point():
        raise ValueError(f"NVFP4 linear with {in_features} inputs got activations {x.dtype} {tuple(x.shape)}")
    out_dtype = out_dtype or x.dtype
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    # [1] or [out] fp32 multipliers; C reads row n's at n * stride
    g = global_scale.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
    lib = kernel() if x.device.type == "cpu" else None
    if lib is not None and 0 < rows <= GEMV_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float32):
        y = _gemv(lib, x2, packed, block_scale, g, round_bf16=x.dtype == torch.bfloat16)
        if bias is not None:
            y += bias
        return y.to(out_dtype).view(*x.shape[:-1], out_features)

    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    step = min(_tile_rows(in_features), out_features)
    if lib is not None:
        buffer = torch.empty(step, in_features, dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        g_rows = g if g.numel() == 1 else g[start:stop]
        if lib is not None:
            w = _dequantize_rows_c(lib, packed[start:stop], block_scale[start:stop], g_rows, x.dtype, buffer[: stop - start])
        else:
            w = _dequantize_rows_torch(packed[start:stop], block_scale[start:stop], g_rows, x.dtype)
        y[:, start:stop] = F.linear(x2, w, None if bias is None else bias[start:stop].to(x.dtype))
    return y.to(out_dtype).view(*x.shape[:-1], out_features)


def _gemv(lib: ctypes.CDLL, x2: Tensor, packed: Tensor, block_scale: Tensor, g: Tensor, round_bf16: bool) -> Tensor:
    """fp32 [rows, out] from the C decode kernel; round_bf16 when x is bf16 (the reference rounds
    the weights to bf16). g: contiguous fp32 [1] or [out]."""
    rows, in_features = x2.shape
    x_bf16 = round_bf16 and lib.bf16_dot and x2.dtype == torch.bfloat16
    xc = (x2 if x_bf16 else x2.float()).contiguous()
    packed, scales = packed.contiguous(), block_scale.contiguous().view(torch.uint8)
    out_features = packed.shape[0]
    y = torch.empty(rows, out_features, dtype=torch.float32)
    status = lib.nvfp4_gemv(
        packed.data_ptr(), scales.data_ptr(), E4M3_BYTE_VALUES.data_ptr(), g.data_ptr(), int(g.numel() > 1),
        xc.data_ptr(), int(x_bf16), y.data_ptr(), rows, out_features, in_features, int(round_bf16), torch.get_num_threads(),
    )
    if status:
        raise MemoryError(f"NVFP4 kernel: no memory for a [{rows}, {in_features}] activation copy")
    return y


def _dequantize_rows_c(
    lib: ctypes.CDLL, packed: Tensor, block_scale: Tensor, g: Tensor, dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """Rows of W in dtype (g: fp32 [1] or one per row); written into out (bf16 for bf16, else
    fp32) when given."""
    packed, scales = packed.contiguous(), block_scale.contiguous().view(torch.uint8)
    g = g.to(torch.float32).reshape(-1).contiguous()
    rows, in_features = packed.shape[0], packed.shape[1] * 2
    direct = dtype == torch.bfloat16
    if out is None:
        out = torch.empty(rows, in_features, dtype=torch.bfloat16 if direct else torch.float32)
    lib.nvfp4_dequantize(
        packed.data_ptr(), scales.data_ptr(), E4M3_BYTE_VALUES.data_ptr(), g.data_ptr(), int(g.numel() > 1),
        out.data_ptr(), rows, in_features, int(direct), torch.get_num_threads(),
    )
    return out if direct else out.to(dtype)


def nvfp4_linear_w4a4(
    x: Tensor,
    packed: Tensor,
    block_scale: Tensor,
    global_scale: Tensor,
    input_global_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """W4A4 emulation: x quantized and dequantized as NVFP4 (blocks of 16 along in, global scale
    input_global_scale in ModelOpt's convention, input_scale = amax / 2688), then the W4A16 path."""
    x_q = dequantize_nvfp4(quantize_nvfp4(x, global_scale=input_global_scale), dtype=x.dtype)
    return nvfp4_linear(x_q, packed, block_scale, global_scale, bias, out_dtype)
