"""Rotary position embeddings (neox / rotate-half layout, as transformers), with the scaling types
the supported configs use: default, linear, llama3, yarn. Partial rotary rotates the first
`rotary_dim` dims of each head and passes the rest through (Qwen3.5: 64 of 256)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fp4serve.errors import UnsupportedModelError


def rope_inv_freq(dim: int, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale ("attention factor") of a rope config."""
    base = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn(dim, base, params, max_position)
    raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported (default, linear, llama3, yarn are)")


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, base: float, p: dict, max_position: int) -> tuple[torch.Tensor, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def mrope_axes(num_freqs: int, section: Sequence[int]) -> torch.Tensor:
    """Which of the (t, h, w) positions drives each rotary frequency in the interleaved M-RoPE
    layout of Qwen3-VL / Qwen3.5 (transformers' recomposition): frequency j follows h when
    j % 3 == 1 and j < 3 * section[1], w when j % 3 == 2 and j < 3 * section[2], else t."""
    j = torch.arange(num_freqs)
    axes = torch.zeros(num_freqs, dtype=torch.long)
    axes[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axes[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axes


class RotaryEmbedding(nn.Module):
    """mrope_section: the model takes (t, h, w) positions (batch.mrope_positions, set when a
    sequence has images); without them, as for all text, the three are equal and this is plain rope."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        rope_parameters: dict,
        max_position: int,
        mrope_section: Sequence[int] | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        # Computed on the CPU, then moved: the memo key needs the values even when the model is
        # built on the meta device (fp4serve doctor builds one to list the expected tensors).
        with torch.device("cpu"):
            inv_freq, self.scale = rope_inv_freq(rotary_dim, rope_parameters, max_position)
            axes = mrope_axes(rotary_dim // 2, mrope_section) if mrope_section is not None else None
        self.memo_key = ("rope", rotary_dim, self.scale, tuple(inv_freq.tolist()))
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)
        if axes is not None:
            self.memo_key += ("mrope", tuple(axes.tolist()))
            axes = axes.to(torch.get_default_device())
        self.register_buffer("mrope_axes", axes, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, rotary_dim] cos and sin, computed in fp32 then cast, exactly as transformers does."""
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def mrope_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin for [3, T] (t, h, w) positions: each frequency at the position of its axis."""
        freqs = positions[self.mrope_axes].T.float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def _tables(self, batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's cos and sign-folded sin [T, 1, rotary_dim], shared by layers with equal
        settings. rotate_half(x) * sin == roll(x, half) * (sin with its first half negated),
        exactly: one roll replaces rotate_half's chunk, neg and cat."""

        def compute():
            if self.mrope_axes is not None and batch.mrope_positions is not None:
                cos, sin = self.mrope_cos_sin(batch.mrope_positions, dtype)
            else:
                cos, sin = self.cos_sin(batch.positions, dtype)
            sin = torch.cat((-sin[:, : self.rotary_dim // 2], sin[:, self.rotary_dim // 2 :]), dim=-1)
            return cos[:, None, :], sin[:, None, :]

        return batch.memo((self.memo_key, dtype), compute)

    def rotate(self, batch, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] at batch.positions -> a rotated copy. q and k heads may come in one
        tensor: they share positions and tables."""
        cos, sin = self._tables(batch, x.dtype)
        if self.rotary_dim == self.head_dim:
            return x * cos + x.roll(self.rotary_dim // 2, dims=-1) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + rot.roll(self.rotary_dim // 2, dims=-1) * sin, rest), dim=-1)

    def forward(self, batch, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D] at batch.positions -> rotated copies."""
        return self.rotate(batch, q), self.rotate(batch, k)
