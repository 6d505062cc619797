"""Number formats inside Triton kernels: E2M1 and E4M3 codes <-> fp32, and bf16 rounding.

All bit arithmetic on int32/fp32, no fp8 or fp4 dtypes: it compiles for every GPU from sm80 (Triton's
float8e4nv needs sm89) and runs unchanged under the interpreter, whose fp8 and bf16 casts round
wrongly. Each function is bit-exact against formats/nvfp4.py and torch's float8_e4m3fn cast
(tests/triton/test_codecs.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The activation and cache dtypes the kernels take, as Triton names them.
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still held in fp32. NaN and inf pass through
    unchanged only for finite inputs' sake: kernels never feed them here."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_value(code):
    """4-bit E2M1 code (int32, 0..15; bit 3 the sign) -> fp32: 0, .5, 1, 1.5, 2, 3, 4, 6.

    The code's bits, placed in an fp16 (sign at bit 15, exponent and mantissa at bits 10..9), are
    that fp16's sign, low exponent bits and top mantissa bit, so the fp16 is the E2M1 value times
    2^-14 (exponent 0 included: fp16 subnormals are exact). Five integer operations and one
    multiply per weight, where decoding the fields costs about three times as many: the NVFP4 GEMV
    decodes one code per weight byte read and must keep up with HBM."""
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def e4m3_value(byte):
    """float8_e4m3fn byte (int32, 0..255) -> fp32. 0x7f/0xff (NaN) never occur as scales or KV."""
    exponent = (byte >> 3) & 15
    mantissa = (byte & 7).to(tl.float32)
    # 2^(exponent - 7) built from its fp32 bits; subnormals (exponent 0) are mantissa/8 * 2^-6
    power = ((tl.maximum(exponent, 1) + 120) << 23).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa * 0.125, 1.0 + mantissa * 0.125) * power
    return tl.where((byte & 128) != 0, -magnitude, magnitude)


@triton.jit
def _round_half_even(y):
    """y >= 0 -> the nearest integer, ties to even (exact: y is a small scaled power-of-two multiple)."""
    floor = tl.floor(y)
    rest = y - floor
    odd = (floor.to(tl.int32) & 1) == 1
    return floor + tl.where((rest > 0.5) | ((rest == 0.5) & odd), 1.0, 0.0)


@triton.jit
def e4m3_code(x):
    """fp32 already within [-448, 448] -> float8_e4m3fn byte (int32), round half to even, as
    torch's cast. The sign bit comes from x's (so -0.0 and tiny negatives give 0x80, as in torch)."""
    bits = x.to(tl.int32, bitcast=True)
    magnitude = tl.abs(x)
    exponent = tl.maximum(((bits >> 23) & 255) - 127, -6)  # below 2^-6: the subnormal step 2^-9
    # |x| / 2^(exponent - 3): 8..16 for normals (0..8 for subnormals), exact in fp32
    steps = _round_half_even(magnitude * ((130 - exponent) << 23).to(tl.float32, bitcast=True))
    code = ((exponent + 7) << 3) + steps.to(tl.int32) - 8  # a carry to 16 steps moves into the exponent
    return code | ((bits >> 24) & 128)


@triton.jit
def e2m1_code(scaled):
    """fp32 already divided by its scale -> E2M1 code (int32): the grid index of |x| rounded half to
    even (ties .25->0, .75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), saturating at 6; bit 3 set
    for x < 0 (formats/nvfp4.py's e2m1_codes)."""
    a = tl.abs(scaled)
    index = (
        (a > 0.25).to(tl.int32)
        + (a >= 0.75).to(tl.int32)
        + (a > 1.25).to(tl.int32)
        + (a >= 1.75).to(tl.int32)
        + (a > 2.5).to(tl.int32)
        + (a >= 3.5).to(tl.int32)
        + (a > 5.0).to(tl.int32)
    )
    return index | tl.where(scaled < 0, 8, 0)


@triton.jit
def to_dot_operand(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 values -> what a tl.dot in DTYPE takes: the DTYPE cast on a GPU; under the interpreter
    with bf16, fp32 holding bf16-rounded values (triton_support.emulate_bf16)."""
    if EMULATE_BF16 and DTYPE == tl.bfloat16:
        return round_to_bf16(x)
    return x.to(DTYPE)


@triton.jit
def to_stored(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 -> DTYPE for a store, rounding half to even also under the interpreter."""
    if EMULATE_BF16 and DTYPE == tl.bfloat16:
        x = round_to_bf16(x)
    return x.to(DTYPE)
