"""Batched decode attention: every one-token query of a step in one SDPA call.

Decode steps dominate serving, and looping over 32 sequences per layer costs more in Python than
the math. Rows are gathered into a padded [B, Hkv, max_ctx, D] view with a length mask. Tested
against layers.attention.paged_attention_ref."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None) -> torch.Tensor:
    """q [B, H, D], one query per sequence at its last context position -> [B, H, D]."""
    block_size = k_cache.shape[1]
    max_ctx = int(context_lens.max())
    pos = torch.arange(max_ctx, device=q.device)
    slots = block_tables[:, pos // block_size] * block_size + pos % block_size  # [B, max_ctx]
    k = k_cache.view(-1, *k_cache.shape[2:])[slots].to(q.dtype)  # [B, max_ctx, Hkv, D]
    v = v_cache.view(-1, *v_cache.shape[2:])[slots].to(q.dtype)
    mask = pos[None, :] < context_lens[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] > context_lens[:, None] - 1 - sliding_window
    mask = mask[:, None, None, :]  # [B, 1, 1, max_ctx]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[:, :, 0, :]
