"""The Qwen3.5 / 3.6 vision tower (transformers `Qwen3_5VisionModel`, checkpoint prefix `model.visual.`).

Pixels arrive as the image processor lays them out: one row per patch of C x T x P x P values (T: the
temporal patch, two copies of a still image), patches of each image grouped in spatial-merge blocks
of m x m. The tower embeds each patch, adds a learned position table resampled to the image's grid,
runs ViT blocks with 2-D rotary attention within each image, then the merger turns every m x m block
into one language-model embedding. Plain torch in the model dtype: NVFP4 checkpoints keep it in
16 bits (docs/reference.md s.2), and its matmuls are a small share of a request.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.errors import UnsupportedModelError
from fp4serve.layers.rotary import rotate_half

Grid = tuple[int, int, int]  # (t, h, w) in patches
ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}


class VisionPatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride over one patch each: a matmul over the flattened patch."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Module()
        shape = (
            config.hidden_size,
            config.in_channels,
            config.temporal_patch_size,
            config.patch_size,
            config.patch_size,
        )
        self.proj.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.proj.bias = nn.Parameter(torch.empty(config.hidden_size), requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixels.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, -1).unbind(1)
        # rotated in fp32, as transformers does, then back to the model dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        # Each image attends only to itself (bidirectionally): one attention call per image.
        out = torch.empty_like(q)
        for start, end in itertools.pairwise(bounds):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
        return self.proj(out.reshape(T, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"vision hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)} are)")
        self.act = ACTIVATIONS[act]
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x, cos, sin, bounds):
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        return x + self.mlp(self.norm2(x))


class VisionMerger(nn.Module):
    """LayerNorm per patch, then each m x m block's patches concatenated through a two-layer MLP."""

    def __init__(self, config):
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size**2
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(self.norm(x).view(-1, self.merged))))


class Qwen3_5VisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.merge = config.spatial_merge_size
        self.patch_embed = VisionPatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.side = int(config.num_position_embeddings**0.5)  # the learned table is side x side
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = VisionMerger(config)
        head_dim = config.hidden_size // config.num_heads
        theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        # head_dim / 4 frequencies for each of the two axes (rows, columns)
        spatial = head_dim // 2
        inv_freq = 1.0 / theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device="cpu") / spatial)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)

    def num_tokens(self, grid: Grid) -> int:
        """Language-model tokens the merger makes of an image of `grid` patches."""
        t, h, w = grid
        return t * h * w // self.merge**2

    def _block_order(self, table: torch.Tensor, grid: Grid) -> torch.Tensor:
        """[h, w, ...] in raster order -> [t * h * w, ...] in the processor's patch order (merge blocks)."""
        t, h, w = grid
        m = self.merge
        blocks = table.reshape(h // m, m, w // m, m, *table.shape[2:]).transpose(1, 2)
        return blocks.reshape(h * w, *table.shape[2:]).repeat(t, *([1] * (table.dim() - 2)))

    def _position_embedding(self, grid: Grid) -> torch.Tensor:
        """The side x side table resampled bilinearly (align_corners) to the h x w grid."""
        _, h, w = grid
        side, device = self.side, self.inv_freq.device

        def axis(n: int):
            src = torch.arange(n, dtype=torch.float32, device=device) * (side - 1) / max(n - 1, 1)
            low = src.floor().long()
            return low, (low + 1).clamp(max=side - 1), src - low

        r0, r1, dr = axis(h)
        c0, c1, dc = axis(w)
        table = self.pos_embed.weight.float()

        def at(r, c):
            return table[(r[:, None] * side + c[None, :]).flatten()].view(h, w, -1)

        dr, dc = dr[:, None, None], dc[None, :, None]
        emb = (
            at(r0, c0) * ((1 - dr) * (1 - dc))
            + at(r0, c1) * ((1 - dr) * dc)
            + at(r1, c0) * (dr * (1 - dc))
            + at(r1, c1) * (dr * dc)
        )
        return self._block_order(emb, grid)

    def _rotary(self, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [t*h*w, 1, head_dim]: row angles then column angles, the pair repeated (rotate-half)."""
        _, h, w = grid
        device = self.inv_freq.device
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        coords = self._block_order(torch.stack((rows, cols), dim=-1), grid).float()  # [N, 2]
        freqs = (coords[:, :, None] * self.inv_freq).flatten(1)  # [N, 2 * head_dim/4]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos(), emb.sin()

    def forward(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """pixels [sum t*h*w, C*T*P*P] of the images in `grids`, in order -> [sum num_tokens, out_hidden]."""
        x = self.patch_embed(pixels)
        pos = torch.cat([self._position_embedding(g) for g in grids])
        x = x + pos.to(x.dtype)
        tables = [self._rotary(g) for g in grids]
        cos, sin = torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables])
        bounds = [0]
        for t, h, w in grids:  # every frame of an image is its own attention segment, as in transformers
            bounds += [bounds[-1] + h * w * (i + 1) for i in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, bounds)
        return self.merger(x)
