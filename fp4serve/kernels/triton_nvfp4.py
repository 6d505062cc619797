"""W4A16 NVFP4 linear on GPUs without FP4 tensor cores (Ampere, Hopper): y = x @ W^T (+ bias), with W
decoded tile by tile from the packed codes and FP8 block scales as stored, never materialized.

Design. A program owns a [BLOCK_M, BLOCK_N] output tile and walks K in steps of BLOCK_K. Each step
loads the packed bytes as a [BLOCK_N, BLOCK_K/2] tile and x's even and odd columns as two
[BLOCK_M, BLOCK_K/2] tiles: the low nibbles multiply the even columns and the high nibbles the odd
ones, so the codes are never interleaved in registers. The block scales are decoded once per
16 elements ([BLOCK_N, BLOCK_K/16]) and broadcast over their byte columns. Weights are computed in
fp32 as ``e2m1(code) * (block_scale * global)`` (the codec's order, kernels/triton_codecs.py), cast to
x's dtype and fed to tl.dot with fp32 accumulation: the reference `F.linear(x, W.to(x.dtype))` up to
the order of the fp32 sums.

Decode (up to DECODE_MAX_ROWS rows) is bound by reading the weights: narrow tiles (BLOCK_N = 32) and,
when those still leave the GPU short of programs, split-K (fp32 partial sums reduced by torch, so
results do not depend on scheduling). Prefill uses large square-ish tiles so the decode work per
weight is shared by many rows. @triton.autotune cannot run under the interpreter (it benchmarks on
a GPU), so `_launch_config` picks tiles with the fixed rules described there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4serve.formats.nvfp4 import BLOCK_SIZE
from fp4serve.kernels.cpu_nvfp4 import _check_weight
from fp4serve.kernels.triton_codecs import TL_DTYPES, e2m1_value, e4m3_value, to_dot_operand, to_stored
from fp4serve.kernels.triton_support import emulate_bf16, sm_count

DECODE_MAX_ROWS = 64
# Programs per SM that decode aims for, so each SM has several tiles' loads in flight to hide latency.
PROGRAMS_PER_SM = 4
# What the interpreter plans for (it has no SMs): an H100's count, so CPU tests run the GPU's grids.
NOMINAL_SMS = 132

@triton.jit
def _nvfp4_linear_kernel(
    x_ptr, packed_ptr, scale_ptr, global_ptr, bias_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_pn, stride_sn, stride_g, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    # int64 row offsets: prefill outputs (rows x vocabulary-sized N) can pass 2^31 elements
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    packed_rows = packed_ptr + offs_n.to(tl.int64)[:, None] * stride_pn
    scale_rows = scale_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    row_global = tl.load(global_ptr + offs_n * stride_g, mask=mask_n, other=0.0)
    byte_cols = tl.arange(0, BLOCK_K // 2)
    block_cols = tl.arange(0, BLOCK_K // BLOCK_SIZE)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        byte = k // 2 + byte_cols
        mask_x = mask_m[:, None] & (byte < K // 2)[None, :]
        mask_w = mask_n[:, None] & (byte < K // 2)[None, :]
        x_even = tl.load(x_rows + (2 * byte)[None, :] * stride_xk, mask=mask_x, other=0.0).to(tl.float32)
        x_odd = tl.load(x_rows + (2 * byte + 1)[None, :] * stride_xk, mask=mask_x, other=0.0).to(tl.float32)
        codes = tl.load(packed_rows + byte[None, :], mask=mask_w, other=0).to(tl.int32)
        block = k // BLOCK_SIZE + block_cols
        mask_s = mask_n[:, None] & (block < K // BLOCK_SIZE)[None, :]
        scale_bytes = tl.load(scale_rows + block[None, :], mask=mask_s, other=0).to(tl.int32)
        scale = e4m3_value(scale_bytes) * row_global[:, None]  # [BLOCK_N, BLOCK_K/16]
        # byte column j belongs to block j // 8: repeat each scale 8 times along the row
        scale = tl.reshape(
            tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_K // BLOCK_SIZE, 8)), (BLOCK_N, BLOCK_K // 2)
        )
        w_even = to_dot_operand(e2m1_value(codes & 15) * scale, DOT_DTYPE, EMULATE_BF16)
        w_odd = to_dot_operand(e2m1_value(codes >> 4) * scale, DOT_DTYPE, EMULATE_BF16)
        x_even = to_dot_operand(x_even, DOT_DTYPE, EMULATE_BF16)
        x_odd = to_dot_operand(x_odd, DOT_DTYPE, EMULATE_BF16)
        # "ieee" keeps fp32 products exact (the GPU default is tf32); 16-bit operands ignore it
        acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision="ieee")
        acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split * stride_split + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, to_stored(acc, OUT_DTYPE, EMULATE_BF16), mask=mask_m[:, None] & mask_n[None, :])


def _launch_config(rows: int, out_features: int, in_features: int, device: torch.device) -> dict:
    """Tiles, split-K and warps for one shape (no autotuning; see the module docstring).

    Decode (rows <= DECODE_MAX_ROWS): BLOCK_M the rows rounded up to a power of two (at least 16,
    the tensor-core tile height), BLOCK_N = 32 so that N / 32 programs (160 for N = 5120) cover the
    GPU, BLOCK_K = 256: 128 bytes, one cache line, of each weight row per step. If that is still
    fewer than PROGRAMS_PER_SM programs per SM, K is split, as far as the fp32 partial sums (written
    and read back once per split) stay within 1/8 of the weight bytes read.
    Prefill: 64 x 128 tiles up to 255 rows, 128 x 128 above, BLOCK_K = 128, no split.
    Small K shrinks BLOCK_K to K's power of two (at least 32: the dots' K of 16)."""
    if rows <= DECODE_MAX_ROWS:
        block_m, block_n, block_k, warps = max(16, triton.next_power_of_2(rows)), 32, 256, 4
    else:
        block_m, block_n, block_k = (64 if rows < 256 else 128), 128, 128
        warps = block_m // 16
    block_k = min(block_k, max(32, triton.next_power_of_2(in_features)))
    k_steps = triton.cdiv(in_features, block_k)
    split = 1
    if rows <= DECODE_MAX_ROWS:
        programs = triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n)
        wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count(device, NOMINAL_SMS), programs)
        weight_bytes = out_features * in_features * 9 // 16  # codes and block scales
        traffic_cap = weight_bytes // (8 * 8 * rows * out_features)
        split = max(1, min(wanted, k_steps, traffic_cap))
    k_per_split = triton.cdiv(k_steps, split) * block_k
    return {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "k_per_split": k_per_split,
        "split": triton.cdiv(in_features, k_per_split), "num_warps": warps, "num_stages": 3,
    }  # fmt: skip


def nvfp4_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias), W = dequantize_nvfp4(packed, block_scale, global_scale) in x's dtype; the
    contract of kernels/cpu_nvfp4.nvfp4_linear. x: bf16/fp16/fp32 [..., in]; packed uint8 [out, in/2];
    block_scale float8_e4m3fn [out, in/16]; global_scale fp32, a scalar or one per output row.
    Returns [..., out] in out_dtype (default x.dtype). The launch reads no device value on the host."""
    _check_weight(packed, block_scale, global_scale)
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    if x.shape[-1] != in_features or x.dtype not in TL_DTYPES:
        raise ValueError(f"NVFP4 linear with {in_features} inputs got activations {x.dtype} {tuple(x.shape)}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in TL_DTYPES:
        raise ValueError(f"NVFP4 linear cannot write {out_dtype}: expected one of {list(TL_DTYPES)}")
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    if rows == 0:
        return torch.empty(*x.shape[:-1], out_features, dtype=out_dtype, device=x.device)
    packed, scales = packed.contiguous(), block_scale.contiguous().view(torch.uint8)
    g = global_scale.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
    config = _launch_config(rows, out_features, in_features, x.device)
    split = config.pop("split")
    # split-K writes fp32 partials [split, rows, out] that torch sums below; else the final output
    partial = split > 1
    y = torch.empty((split, rows, out_features) if partial else (rows, out_features),
                    dtype=torch.float32 if partial else out_dtype, device=x.device)  # fmt: skip
    grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(out_features, config["BLOCK_N"]), split)
    _nvfp4_linear_kernel[grid](
        x2, packed, scales, g, bias if bias is not None and not partial else x2, y,
        rows, out_features, in_features, config.pop("k_per_split"),
        x2.stride(0), x2.stride(1), packed.stride(0), scales.stride(0), int(g.numel() > 1), rows * out_features,
        HAS_BIAS=bias is not None and not partial, DOT_DTYPE=TL_DTYPES[x.dtype],
        OUT_DTYPE=tl.float32 if partial else TL_DTYPES[out_dtype], EMULATE_BF16=emulate_bf16(), **config,
    )  # fmt: skip
    if partial:
        y = y.sum(0)
        if bias is not None:
            y += bias
        y = y.to(out_dtype)
    return y.view(*x.shape[:-1], out_features)
