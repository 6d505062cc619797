"""This step's K/V into the paged caches, encoded on the way: layers/attention.py's write_kv on the GPU.

One program per token writes its [Hkv, D] rows, K and V, in the cache's format (formats/kv_codec.py),
bit for bit `KVCacheFormat.encode`:

plain     a cast to the cache dtype (round half to even, also under the interpreter);
fp8_e4m3  x / scale (correctly rounded: tl.math.div_rn), saturated at +-448, as an E4M3 byte;
nvfp4     per 16 elements along D: block scale e4m3(amax / 6 / g) saturated at 448 (1.0 where it is 0),
          codes e2m1(x / (s * g)), the even element in the low nibble; D/2 code bytes then D/16 scale bytes.

A slot < 0 is skipped: the padding rows of a captured decode step write there (vLLM's PAD_SLOT_ID).
Unlike write_kv, nothing is returned: the Triton attention reads this step's rows back from the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4serve.formats.kv_codec import KVQuant
from fp4serve.formats.nvfp4 import BLOCK_SIZE
from fp4serve.kernels.triton_codecs import TL_DTYPES, e2m1_code, e4m3_code, e4m3_value, to_stored
from fp4serve.kernels.triton_support import emulate_bf16

# constexpr: the kernels branch on them at compile time
PLAIN, FP8, NVFP4 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FORMAT_CODES = {"fp8_e4m3": FP8, "nvfp4": NVFP4}
E4M3_ONE = tl.constexpr(0x38)  # the E4M3 byte of 1.0: the block scale stored where amax gives 0


@triton.jit
def _encode_rows(
    x_ptr, cache_ptr, scale_ptr, token, slot, stride_xt, stride_xh, stride_slot, stride_ch,
    HKV: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    FORMAT: tl.constexpr, CACHE_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, H_PAD)[:, None]
    x_rows = x_ptr + token * stride_xt + heads * stride_xh
    row = cache_ptr + slot * stride_slot + heads * stride_ch
    if FORMAT == NVFP4:  # even and odd elements apart, as they pair up in the code bytes
        pairs = tl.arange(0, BLOCK_D // 2)[None, :]
        mask = (heads < HKV) & (pairs < D // 2)
        even = tl.load(x_rows + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(x_rows + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(scale_ptr)
        # a block of 16 elements is 8 consecutive pairs
        even_blocks = tl.reshape(even, (H_PAD, BLOCK_D // 16, 8))
        odd_blocks = tl.reshape(odd, (H_PAD, BLOCK_D // 16, 8))
        amax = tl.maximum(tl.max(tl.abs(even_blocks), axis=2), tl.max(tl.abs(odd_blocks), axis=2))  # [H_PAD, D/16]
        block_scale = tl.minimum(tl.math.div_rn(tl.math.div_rn(amax, 6.0), g), 448.0)
        scale_byte = e4m3_code(block_scale)
        scale_byte = tl.where(e4m3_value(scale_byte) == 0.0, E4M3_ONE, scale_byte)
        divisor = e4m3_value(scale_byte) * g  # s * g, in the codec's order
        divisor = tl.reshape(tl.broadcast_to(divisor[:, :, None], (H_PAD, BLOCK_D // 16, 8)), (H_PAD, BLOCK_D // 2))
        codes = e2m1_code(tl.math.div_rn(even, divisor)) | (e2m1_code(tl.math.div_rn(odd, divisor)) << 4)
        tl.store(row + pairs, codes.to(tl.uint8), mask=mask)
        blocks = tl.arange(0, BLOCK_D // 16)[None, :]
        tl.store(row + D // 2 + blocks, scale_byte.to(tl.uint8), mask=(heads < HKV) & (blocks < D // 16))
    else:
        cols = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < HKV) & (cols < D)
        x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
        if FORMAT == FP8:  # into the cache viewed as bytes
            x = tl.minimum(tl.maximum(tl.math.div_rn(x, tl.load(scale_ptr)), -448.0), 448.0)
            tl.store(row + cols, e4m3_code(x).to(tl.uint8), mask=mask)
        else:
            tl.store(row + cols, to_stored(x, CACHE_DTYPE, EMULATE_BF16), mask=mask)


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_slot, stride_ch,
    HKV: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    FORMAT: tl.constexpr, CACHE_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        _encode_rows(
            k_ptr, k_cache_ptr, k_scale_ptr, token, slot, stride_kt, stride_kh, stride_slot, stride_ch,
            HKV, D, H_PAD, BLOCK_D, FORMAT, CACHE_DTYPE, EMULATE_BF16,
        )  # fmt: skip
        _encode_rows(
            v_ptr, v_cache_ptr, v_scale_ptr, token, slot, stride_vt, stride_vh, stride_slot, stride_ch,
            HKV, D, H_PAD, BLOCK_D, FORMAT, CACHE_DTYPE, EMULATE_BF16,
        )  # fmt: skip


def write_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    kv: KVQuant | None = None,
) -> None:
    """Encode k, v [T, Hkv, D] as `kv` says (default: plain in the cache dtype) and store them at the
    flat slots [T] (block * block_size + offset; < 0: skipped) of contiguous caches
    [num_blocks, block_size, Hkv, row_width]. No host synchronisation: capturable in a CUDA graph."""
    kv = kv or KVQuant.plain(k_cache.dtype)
    T, Hkv, D = k.shape
    if T == 0:
        return
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous [num_blocks, block_size, Hkv, row_width]")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    fmt = FORMAT_CODES.get(kv.format.name, PLAIN)
    if fmt == FP8:  # stored as bytes: no fp8 dtype in the kernel (triton_codecs.py)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    # the scales stay 0-d device tensors, read in the kernel; a plain cache reads none
    k_scale, v_scale = (kv.k_scale, kv.v_scale) if fmt != PLAIN else (slots, slots)
    _kv_write_kernel[(T,)](
        k, v, k_cache, v_cache, slots, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        HKV=Hkv, D=D, H_PAD=triton.next_power_of_2(Hkv), BLOCK_D=max(BLOCK_SIZE, triton.next_power_of_2(D)),
        FORMAT=fmt, CACHE_DTYPE=TL_DTYPES.get(k_cache.dtype, tl.uint8), EMULATE_BF16=emulate_bf16(),
    )  # fmt: skip
