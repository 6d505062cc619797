"""Rotary and RMSNorm fast forms against their reference formulas."""
from __future__ import annotations

import pytest
import torch

from fp4serve.forward_batch import ForwardBatch, SequenceRows, build_batch
from fp4serve.layers.norm import RMSNorm, rms_norm
from fp4serve.layers.rotary import RotaryEmbedding, rotate_half


def _batch(positions: list[int]) -> ForwardBatch:
    """Only positions matter to rotary: a one-token sequence at each of `positions`."""
    return build_batch([SequenceRows([p], p, [0] * (p // 16 + 1)) for p in positions], 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 16])
def test_roll_rotary_equals_rotate_half_formula(dtype, rotary_dim):
    rope = RotaryEmbedding(64, rotary_dim, {"rope_type": "default", "rope_theta": 10000.0}, 512)
    positions = [0, 1, 5, 77, 300]
    x = torch.randn(len(positions), 6, 64).to(dtype)
    cos, sin = (t[:, None, :] for t in rope.cos_sin(torch.tensor(positions), dtype))
    rot = x[..., :rotary_dim]
    expected = torch.cat((rot * cos + rotate_half(rot) * sin, x[..., rotary_dim:]), dim=-1)
    torch.testing.assert_close(rope.rotate(_batch(positions), x), expected, atol=0, rtol=0)


def test_fused_rms_norm_equals_reference_in_fp32_and_is_close_in_bf16():
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data.normal_(1, 0.1)
    x = torch.randn(7, 96) * 3
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, 1e-5, False), atol=0, rtol=0)
    norm16 = RMSNorm(96, eps=1e-5)
    norm16.weight.data = norm.weight.data.bfloat16()
    x16 = x.bfloat16()
    exact = rms_norm(x16.double(), norm16.weight.double(), 1e-5, False)
    # One rounding at the end: at least as close to exact as transformers' two roundings.
    fused_err = (norm16(x16).double() - exact).abs().max()
    reference_err = (rms_norm(x16, norm16.weight, 1e-5, False).double() - exact).abs().max()
    assert fused_err <= reference_err
