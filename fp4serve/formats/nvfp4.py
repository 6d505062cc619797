"""NVFP4 codec: tensors <-> packed E2M1 codes with FP8 block scales and an FP32 global scale.

Plain torch, no model knowledge. The numbers follow NVIDIA ModelOpt (docs/reference.md section 1):

- blocks of 16 consecutive elements along the last dimension share one float8_e4m3fn scale;
- the whole tensor shares one float32 global scale ``g = amax / (6 * 448)`` (ModelOpt's
  ``weight_scale_2``, a multiplier); compressed-tensors stores its reciprocal,
  ``weight_global_scale = 1 / g`` (a divisor): see `to_ct_global_scale` / `from_ct_global_scale`;
- block scale ``s_b = fp8_e4m3(amax_b / 6 / g)``, saturated at 448;
- element code = sign bit (bit 3) | index of ``|x| / (s_b * g)`` rounded half-to-even onto the
  E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (index 0..7), saturating at 6;
- two codes per byte, the first (even-index) element in the low nibble;
- dequantized ``w = e2m1(code) * float(s_b) * g``.

Where ModelOpt and compressed-tensors (the test oracle) differ, this module picks:

- A block whose scale is zero in FP8 (an all-zero block, or one so small next to the tensor's
  amax that its scale underflows FP8) stores scale 1.0, as ModelOpt does for all-zero blocks.
  compressed-tensors stores 0.125 (the FP8 epsilon) instead. ModelOpt only replaces a scale that is
  zero before the FP8 cast, so for an underflowing block it would store 0 and divide by it. The codes
  are the same (all magnitude 0), and so is the dequantized tensor: zeros.
- An all-zero tensor gets global scale 1.0 (ModelOpt would divide 0 by 0). compressed-tensors'
  ``generate_gparam`` also falls back to 1.0 there.
- The arithmetic is ModelOpt's: ``amax_b / 6 / g`` and ``x / (s_b * g)``. compressed-tensors
  computes ``(amax_b / 6) * gs`` and ``x / (s_b / gs)`` with ``gs = 1 / g``; in float32 the two
  can differ in the last bit, and each then breaks a value sitting exactly on a rounding midpoint
  its own way. That is rare for float32 weights but common for bf16/fp16 ones, whose short
  mantissas make exact midpoints frequent (~0.05% of codes differ by one step on a bf16 Gaussian).
  With a power-of-two global scale both are exact and agree bit for bit.
- Rounding is round-half-to-even in both (ties 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
  3.5->4, 5->4), and the sign bit is set for ``x < 0`` in both, so a negative value that rounds
  to zero is code 8 (-0) while an input of -0.0 is code 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0

# Value of each 4-bit code: index 0..7 are the E2M1 magnitudes, 8..15 the same with the sign bit.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

# Value of each float8_e4m3fn byte (0x7f and 0xff are NaN), as float32: byte -> block scale.
E4M3_BYTE_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()

# Midpoints between neighbouring grid magnitudes. A magnitude's index is the number of midpoints
# it passes; at an exact midpoint, round half to even picks the neighbour with an even mantissa
# (0, 1, 2, 4), so it counts as passed at 0.75, 1.75 and 3.5 only. Those three enter the table as the
# float32 just below them, so that "passed" is a strict > for all seven (one bucketize call).
_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
_MIDPOINTS_STRICT = torch.where(
    torch.tensor([False, True, False, True, False, True, False]),
    torch.nextafter(_MIDPOINTS, torch.tensor(0.0)),
    _MIDPOINTS,
)


@dataclass(frozen=True)
class NVFP4Tensor:
    """An NVFP4-quantized tensor of logical shape [..., K].

    packed:       uint8 [..., K/2], two E2M1 codes per byte, even-index element in the low nibble.
    block_scale:  float8_e4m3fn [..., K/16].
    global_scale: float32 0-d tensor, ModelOpt's ``weight_scale_2`` (multiply by it).
    """

    packed: Tensor
    block_scale: Tensor
    global_scale: Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    @property
    def ct_global_scale(self) -> Tensor:
        """compressed-tensors' ``weight_global_scale`` for this tensor (the reciprocal)."""
        return to_ct_global_scale(self.global_scale)

    @classmethod
    def from_compressed_tensors(cls, weight_packed: Tensor, weight_scale: Tensor, weight_global_scale: Tensor):
        """Build from a compressed-tensors checkpoint's three tensors (same packing and block scales)."""
        return cls(weight_packed, weight_scale, from_ct_global_scale(weight_global_scale))


def to_ct_global_scale(weight_scale_2: float | Tensor) -> Tensor:
    """ModelOpt ``weight_scale_2`` (amax/2688, a multiplier) -> compressed-tensors
    ``weight_global_scale`` (2688/amax, a divisor)."""
    return 1.0 / torch.as_tensor(weight_scale_2, dtype=torch.float32).reshape(())


def from_ct_global_scale(weight_global_scale: float | Tensor) -> Tensor:
    """compressed-tensors ``weight_global_scale`` -> ModelOpt ``weight_scale_2``. Note that
    1/(1/g) need not equal g in float32, so a round trip may move the last bit."""
    return 1.0 / torch.as_tensor(weight_global_scale, dtype=torch.float32).reshape(())


def pack_fp4(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 [..., K] -> uint8 [..., K/2], element 2i in the low nibble of byte i."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack FP4 codes of shape {tuple(codes.shape)}: last dimension must be even")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: Tensor) -> Tensor:
    """uint8 [..., K/2] -> uint8 codes 0..15 [..., K]; inverse of `pack_fp4`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def e2m1_codes(scaled: Tensor) -> Tensor:
    """Float tensor already divided by its scale -> uint8 E2M1 codes (sign bit 3, magnitude index
    0..7), rounding half to even and saturating at 6."""
    negative = scaled < 0
    midpoints = _MIDPOINTS_STRICT.to(scaled.device)
    # bucketize(right=False) counts the midpoints strictly below each magnitude
    index = torch.bucketize(scaled.abs().float(), midpoints, out_int32=True).to(torch.uint8)
    return index | (negative.to(torch.uint8) << 3)


def _global_scale_tensor(global_scale: float | Tensor, device: torch.device) -> Tensor:
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=device)
    if g.numel() != 1:
        raise ValueError(f"global_scale must be a scalar, got shape {tuple(g.shape)}")
    g = g.reshape(())
    if not (torch.isfinite(g) and g > 0):
        raise ValueError(f"global_scale must be finite and positive, got {g.item()}")
    return g


def quantize_nvfp4(x: Tensor, global_scale: float | Tensor | None = None) -> NVFP4Tensor:
    """Quantize a float tensor [..., K] (K a multiple of 16) to NVFP4.

    global_scale is ModelOpt's ``weight_scale_2`` (a multiplier); by default amax(|x|) / (6 * 448),
    which maps the largest block scale onto FP8's maximum. Pass one to share it between tensors
    (fused q/k/v or gate/up projections).
    """
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"NVFP4 needs the last dimension to be a positive multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}"
        )
    # Every input dtype goes through float32 (bf16/fp16 -> fp32 is exact), as in ModelOpt.
    blocks = x.float().unflatten(-1, (-1, BLOCK_SIZE))
    block_amax = blocks.abs().amax(dim=-1)

    if not torch.isfinite(block_amax).all():
        raise ValueError(f"cannot quantize a tensor with non-finite values (shape {tuple(x.shape)})")

    if global_scale is None:
        g = block_amax.amax() / (E2M1_MAX * E4M3_MAX)
        # All zeros (or an amax so tiny that g underflows): any scale works; 1.0 avoids 0/0.
        g = torch.where(g > 0, g, torch.ones_like(g))
    else:
        g = _global_scale_tensor(global_scale, x.device)

    # torch's cast to float8_e4m3fn turns values beyond 448 into NaN rather than saturating, so
    # clamp first (a caller-supplied global scale can be smaller than this tensor needs).
    block_scale = (block_amax / E2M1_MAX / g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    block_scale = torch.where(block_scale == 0, 1.0, block_scale)

    scaled = blocks / (block_scale * g).unsqueeze(-1)
    codes = e2m1_codes(scaled).flatten(-2)
    return NVFP4Tensor(packed=pack_fp4(codes), block_scale=block_scale.to(torch.float8_e4m3fn), global_scale=g)


def dequantize_nvfp4(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """NVFP4 -> dense tensor [..., K]: e2m1(code) * float(block_scale) * global_scale, computed in
    float32 and then cast to dtype."""
    codes = unpack_fp4(t.packed)
    # uint8 index tensors mean boolean masks to torch; int32 indexes by value at half int64's memory.
    values = E2M1_VALUES.to(codes.device)[codes.to(torch.int32)].unflatten(-1, (-1, BLOCK_SIZE))
    scale = t.block_scale.float() * t.global_scale.to(device=codes.device, dtype=torch.float32)
    return (values * scale.unsqueeze(-1)).flatten(-2).to(dtype)
