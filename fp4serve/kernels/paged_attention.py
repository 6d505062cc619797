"""Batched decode attention: every one-token query of a step in one set of batched matmuls.

Decode steps dominate serving, and looping over 32 sequences per layer costs more in Python than
the math. Rows are gathered into a padded [B, Hkv, max_ctx, D] view with a length mask. Plain
matmuls in fp32 rather than SDPA: torch's CPU SDPA kernel is tuned for long queries and is ~4x
slower for one-token queries in bf16. Tested against layers.attention.paged_attention_ref."""
from __future__ import annotations

import torch


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None) -> torch.Tensor:
    """q [B, H, D], one query per sequence at its last context position -> [B, H, D]."""
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    block_size = k_cache.shape[1]
    max_ctx = int(context_lens.max())
    pos = torch.arange(max_ctx, device=q.device)
    slots = block_tables[:, pos // block_size] * block_size + pos % block_size  # [B, max_ctx]
    # index_select, not advanced indexing: the latter is ~30x slower on CPU for this gather.
    flat = slots.view(-1)
    k = k_cache.view(-1, Hkv, D).index_select(0, flat).view(B, max_ctx, Hkv, D).transpose(1, 2).float()
    v = v_cache.view(-1, Hkv, D).index_select(0, flat).view(B, max_ctx, Hkv, D).transpose(1, 2).float()
    visible = pos[None, :] < context_lens[:, None]
    if sliding_window is not None:
        visible &= pos[None, :] > context_lens[:, None] - 1 - sliding_window
    qg = q.float().view(B, Hkv, H // Hkv, D)  # query heads grouped by the KV head they share
    scores = (qg @ k.transpose(-1, -2)) * scale  # [B, Hkv, group, max_ctx]
    scores.masked_fill_(~visible[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [B, Hkv, group, D]
    return out.view(B, H, D).to(q.dtype)
