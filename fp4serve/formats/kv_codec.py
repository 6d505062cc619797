"""How attention layers store K and V: the `--kv-cache-dtype` formats (docs/reference.md section 3).

plain     the values as they are, in a 16/32-bit dtype (`auto`: the model dtype; or `bfloat16`).
fp8_e4m3  fp8(x / scale): one float32 scale per layer for K (k_scale) and one for V (v_scale).
nvfp4     per token and KV head, head_dim/2 bytes of packed E2M1 codes followed by head_dim/16
          bytes of E4M3 block scales (16 elements along head_dim share one), plus one float32
          global scale per layer for K and one for V. Encoded and decoded by formats/nvfp4.py.

Every format keeps one tensor per K and V shaped [num_blocks, block_size, Hkv, row_width], so the
whole-block gathers of the attention paths work on all of them unchanged, and only the gathered
rows are decoded. Quantize on write, dequantize on read: a software path, no fused kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fp4serve.errors import ConfigError
from fp4serve.formats.nvfp4 import BLOCK_SIZE, E2M1_MAX, E2M1_VALUES, E4M3_BYTE_VALUES, E4M3_MAX, quantize_nvfp4

PLAIN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZED = ("fp8_e4m3", "nvfp4")


@dataclass(frozen=True)
class KVCacheFormat:
    name: str  # bfloat16 | float16 | float32 | fp8_e4m3 | nvfp4

    @classmethod
    def plain(cls, dtype: torch.dtype) -> "KVCacheFormat":
        return cls(str(dtype).removeprefix("torch."))

    @property
    def quantized(self) -> bool:
        return self.name in QUANTIZED

    @property
    def storage_dtype(self) -> torch.dtype:
        return {"fp8_e4m3": torch.float8_e4m3fn, "nvfp4": torch.uint8}.get(self.name) or PLAIN_DTYPES[self.name]

    def row_width(self, head_dim: int) -> int:
        """Stored elements per token and KV head."""
        return head_dim // 2 + head_dim // BLOCK_SIZE if self.name == "nvfp4" else head_dim

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        """K and V of one token in one layer."""
        return 2 * num_kv_heads * self.row_width(head_dim) * self.storage_dtype.itemsize

    def check_head_dim(self, head_dim: int) -> None:
        if self.name == "nvfp4" and head_dim % BLOCK_SIZE:
            raise ConfigError(
                f"--kv-cache-dtype nvfp4 needs head_dim to be a multiple of {BLOCK_SIZE} (blocks of "
                f"{BLOCK_SIZE} along head_dim share a scale); this model has head_dim {head_dim}: use fp8"
            )

    def scale_for_amax(self, amax: Tensor) -> Tensor:
        """The per-tensor scale that maps amax onto the format's largest value: amax/448 for fp8
        (vLLM's k_scale), amax/(6*448) for nvfp4 (ModelOpt's global scale). 1.0 for an all-zero tensor."""
        top = E4M3_MAX if self.name == "fp8_e4m3" else E2M1_MAX * E4M3_MAX
        scale = amax.float() / top
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def encode(self, x: Tensor, scale: Tensor) -> Tensor:
        """x [..., D] -> stored rows [..., row_width] in storage_dtype."""
        if self.name == "fp8_e4m3":
            # torch's float8 cast makes NaN of values beyond 448: saturate as the CUDA kernels do.
            return (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        if self.name == "nvfp4":
            t = quantize_nvfp4(x, global_scale=scale)
            return torch.cat((t.packed, t.block_scale.view(torch.uint8)), dim=-1)
        return x.to(self.storage_dtype)

    def decode(self, stored: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
        """Stored rows [..., row_width] -> values [..., D] in dtype: bit for bit the float32
        computation (value * scale, then cast) of docs/reference.md and of formats/nvfp4.py's
        dequantize_nvfp4."""
        if self.name == "fp8_e4m3":
            # Each result depends on one byte: decode through a 256-entry table made for this scale
            # and dtype (torch's elementwise fp8 conversion is ~10x slower than this gather on CPU).
            table = (E4M3_BYTE_VALUES.to(stored.device) * scale).to(dtype)
            return table.index_select(0, stored.view(torch.uint8).reshape(-1).int()).view(stored.shape)
        if self.name == "nvfp4":
            half = stored.shape[-1] * BLOCK_SIZE // (BLOCK_SIZE + 2)  # row = D/2 code bytes + D/16 scale bytes
            codes, block_scale = stored[..., :half], stored[..., half:]
            # One gather per byte, of both nibbles' values at once (a [256, 2] table viewed as one
            # int64 per byte: a 1-D gather is ~30x faster than a 2-column one); block scales too.
            pairs = _BYTE_VALUES.to(stored.device).view(torch.int64).view(-1)
            values = pairs.index_select(0, codes.reshape(-1).int()).view(torch.float32)
            values = values.view(*codes.shape[:-1], -1, BLOCK_SIZE)
            scales = (E4M3_BYTE_VALUES.to(stored.device) * scale).index_select(0, block_scale.reshape(-1).int())
            return (values * scales.view(*values.shape[:-1], 1)).flatten(-2).to(dtype)
        return stored.to(dtype)



# The two E2M1 values of each packed byte, low nibble (the even element) first: [256, 2] float32.
_BYTE_VALUES = torch.stack((E2M1_VALUES[torch.arange(256) & 0x0F], E2M1_VALUES[torch.arange(256) >> 4]), dim=-1)


def resolve_kv_cache_format(kv_cache_dtype: str, model_dtype: torch.dtype) -> KVCacheFormat:
    """--kv-cache-dtype -> format. auto: the model dtype; fp8 is fp8_e4m3 (as in vLLM)."""
    if kv_cache_dtype == "auto":
        return KVCacheFormat.plain(model_dtype)
    return KVCacheFormat({"fp8": "fp8_e4m3"}.get(kv_cache_dtype, kv_cache_dtype))


@dataclass
class KVQuant:
    """One attention layer's storage: the format and the layer's K and V scales (float32 0-d
    tensors, shared with the layer so calibration and checkpoint loading update them in place)."""

    format: KVCacheFormat
    k_scale: Tensor
    v_scale: Tensor

    @classmethod
    def plain(cls, dtype: torch.dtype) -> "KVQuant":
        one = torch.ones((), dtype=torch.float32)
        return cls(KVCacheFormat.plain(dtype), one, one)

    def encode(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.format.encode(k, self.k_scale), self.format.encode(v, self.v_scale)

    def decode_k(self, stored: Tensor, dtype: torch.dtype) -> Tensor:
        return self.format.decode(stored, self.k_scale, dtype)

    def decode_v(self, stored: Tensor, dtype: torch.dtype) -> Tensor:
        return self.format.decode(stored, self.v_scale, dtype)
