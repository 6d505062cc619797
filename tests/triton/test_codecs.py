"""The in-kernel number formats, bit for bit against formats/nvfp4.py and torch's casts, over every code."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl

from fp4serve.formats.nvfp4 import E2M1_VALUES, E4M3_BYTE_VALUES, e2m1_codes
from fp4serve.kernels.triton_codecs import (
    e2m1_code,
    e2m1_value,
    e4m3_code,
    e4m3_value,
    round_to_bf16,
)


@triton.jit
def _apply(x_ptr, out_ptr, n, WHICH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    if WHICH == 0:
        y = e2m1_value(x)
    elif WHICH == 1:
        y = e4m3_value(x)
    elif WHICH == 2:
        y = e4m3_code(x)
    elif WHICH == 3:
        y = e2m1_code(x)
    else:
        y = round_to_bf16(x)
    tl.store(out_ptr + offs, y, mask=mask)


def apply(x: torch.Tensor, which: int, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _apply[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), WHICH=which, BLOCK=1024)
    return out


def test_e2m1_and_e4m3_values_cover_every_code(device):
    codes = torch.arange(16, dtype=torch.int32, device=device)
    assert torch.equal(apply(codes, 0, torch.float32).cpu(), E2M1_VALUES)
    finite = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.int32, device=device)
    assert torch.equal(apply(finite, 1, torch.float32).cpu(), E4M3_BYTE_VALUES[finite.cpu().long()])


def test_e4m3_code_rounds_as_torch_casts(device):
    torch.manual_seed(0)
    x = torch.cat([
        torch.randn(20000) * 60,
        torch.randn(20000) * 0.01,  # subnormals and the smallest normals
        (E4M3_BYTE_VALUES[:126] + E4M3_BYTE_VALUES[1:127]) / 2,  # exact ties between neighbours
        -(E4M3_BYTE_VALUES[:126] + E4M3_BYTE_VALUES[1:127]) / 2,
        torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-10, 2.0**-11, 31.5, 31.9]),
    ]).clamp(-448, 448)
    got = apply(x.to(device), 2, torch.int32).cpu()
    expected = x.to(torch.float8_e4m3fn).view(torch.uint8).int()
    assert torch.equal(got, expected), x[got != expected][:8]


def test_e2m1_code_matches_the_codec(device):
    torch.manual_seed(1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    ties = (grid[:-1] + grid[1:]) / 2
    x = torch.cat([torch.randn(20000) * 3, ties, -ties, grid, -grid, torch.tensor([7.0, -9.0, -1e-9])])
    got = apply(x.to(device), 3, torch.int32).cpu()
    assert torch.equal(got, e2m1_codes(x).int())


def test_round_to_bf16_is_round_half_to_even(device):
    torch.manual_seed(2)
    x = torch.cat([torch.randn(50000) * 100, torch.randn(1000) * 1e-30])
    # values exactly halfway between two bf16 numbers
    bits = x.bfloat16().float().view(torch.int32)
    x = torch.cat([x, (bits + 0x8000).view(torch.float32)])
    got = apply(x.to(device), 4, torch.float32).cpu()
    assert torch.equal(got, x.bfloat16().float())
