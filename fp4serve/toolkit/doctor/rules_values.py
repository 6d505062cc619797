"""Values: NaN/Inf anywhere, all-zero weight matrices, block scales or packed codes.

V01 NaN or Inf in a tensor (for FP8 block scales: the NaN bytes 0x7f/0xff); V02 an all-zero weight
matrix, block-scale tensor or packed-code tensor (1-D tensors are skipped: zero-centred norms and
biases are legitimately zero). Tensors are read in slices of at most SLICE_BYTES, so memory stays
bounded whatever the shard size."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from safetensors import safe_open

from fp4serve.formats.safetensors_file import DTYPE_BYTES
from fp4serve.toolkit.doctor.findings import ERROR, WARNING, Context, Finding, listing

SLICE_BYTES = 64 << 20
FLOATS = {"F16", "BF16", "F32", "F64"}


def scan(f, name: str, shape: tuple[int, ...], dtype: str) -> tuple[bool, bool]:
    """(has NaN/Inf, all zero) of one tensor, a slice of rows at a time."""
    if not shape or shape[0] == 0:
        t = f.get_tensor(name)
        return _nonfinite(t, dtype), not bool(_as_bits(t, dtype).any())
    row_bytes = DTYPE_BYTES.get(dtype, 1) * max(1, int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1)
    step = max(1, SLICE_BYTES // max(1, row_bytes))
    sliced = f.get_slice(name)
    bad, nonzero = False, False
    for start in range(0, shape[0], step):
        t = sliced[start : start + step]
        bad = bad or _nonfinite(t, dtype)
        nonzero = nonzero or bool(_as_bits(t, dtype).any())
        if bad and nonzero:
            break
    return bad, not nonzero


def _as_bits(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """-0.0 counts as zero for floats; other types by their bytes."""
    if dtype in FLOATS:
        return t != 0
    return t.view(torch.uint8) & (0x7F if dtype.startswith("F8") else 0xFF)


def _nonfinite(t: torch.Tensor, dtype: str) -> bool:
    if dtype in FLOATS:
        return not bool(torch.isfinite(t).all())
    if dtype == "F8_E4M3":
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    return False


def check(ctx: Context) -> Iterator[Finding]:
    if not ctx.check_values:
        return
    nonfinite, zero = [], []
    for header in ctx.headers.values():
        with safe_open(str(header.path), framework="pt") as f:
            for name, entry in header.tensors.items():
                if entry.dtype not in FLOATS and entry.dtype not in ("F8_E4M3", "U8"):
                    continue
                bad, all_zero = scan(f, name, entry.shape, entry.dtype)
                if bad:
                    nonfinite.append(name)
                is_matrix = len(entry.shape) >= 2 or name.endswith(("weight_scale", "weight_packed"))
                if all_zero and is_matrix:
                    zero.append(name)
    if nonfinite:
        yield Finding(ERROR, "V01", f"{len(nonfinite)} tensors hold NaN or Inf: {listing(nonfinite)}",
                      "re-export from the source weights (calibration or conversion overflowed)")  # fmt: skip
    if zero:
        yield Finding(WARNING, "V02", f"{len(zero)} weight tensors are all zero: {listing(zero)}",
                      "check the export: an all-zero matrix or block-scale tensor usually means lost weights")  # fmt: skip
