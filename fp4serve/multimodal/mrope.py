"""M-RoPE positions of a prompt with images, as transformers' Qwen3.5 / Qwen3-VL `get_rope_index`.

Text tokens take one position for all three sections (t, h, w), counting on from the previous
token. An image's merged grid of t x h' x w' tokens (h' = h / merge) starts at the next position p:
token (i, j, k) gets (p + i, p + j, p + k), and the text after it continues at p + max(h', w')."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Grid = tuple[int, int, int]


def mrope_positions(num_tokens: int, images: Sequence[tuple[int, Grid]], merge: int) -> tuple[torch.Tensor, int]:
    """images: (first placeholder index, patch grid) of each image, in prompt order. Returns the
    [3, num_tokens] positions and the delta: a token at index i >= num_tokens (generated) sits at
    i + delta in all three sections."""
    out = torch.empty(3, num_tokens, dtype=torch.long)
    index = position = 0
    for offset, (t, h, w) in images:
        out[:, index:offset] = torch.arange(position, position + offset - index)
        position += offset - index
        grid_t, grid_h, grid_w = torch.meshgrid(
            torch.arange(t), torch.arange(h // merge), torch.arange(w // merge), indexing="ij"
        )
        n = grid_t.numel()
        out[:, offset : offset + n] = torch.stack((grid_t, grid_h, grid_w)).reshape(3, n) + position
        position += max(h, w) // merge
        index = offset + n
    out[:, index:] = torch.arange(position, position + num_tokens - index)
    return out, int(out.max()) + 1 - num_tokens
