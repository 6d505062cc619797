"""Paged attention over a block-table KV cache.

`paged_attention_ref` is the reference: one sequence at a time, K/V gathered from the cache
through the block table, plain SDPA with a causal offset mask. Fast paths in kernels/ must match it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.forward_batch import ForwardBatch
from fp4serve.kernels.paged_attention import decode_attention, gather_plan
from fp4serve.layers.cache_spec import KVCacheSpec


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] at flat slots of caches shaped [num_blocks, block_size, Hkv, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    causal: bool,
    sliding_window: int | None = None,
    seqs: list[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D] for the sequences `seqs` (default all), written into `out`.
    Token j of a sequence with c cached tokens before this step sees cache positions [0, c + j]
    (causal) or the whole context (non-causal)."""
    out = torch.empty_like(q) if out is None else out
    for i in range(batch.num_seqs) if seqs is None else seqs:
        rows = batch.seq_rows(i)
        ctx = int(batch.context_lens[i])
        k = gather_kv(k_cache, batch.block_tables[i], ctx).to(q.dtype)
        v = gather_kv(v_cache, batch.block_tables[i], ctx).to(q.dtype)
        qi = q[rows].transpose(0, 1)  # [H, q, D]
        mask = None
        if causal:
            q_pos = torch.arange(batch.num_computed[i], ctx, device=q.device)
            k_pos = torch.arange(ctx, device=q.device)
            mask = q_pos[:, None] >= k_pos[None, :]
            if sliding_window is not None:  # transformers: key visible while q_pos - k_pos < window
                mask &= q_pos[:, None] - k_pos[None, :] < sliding_window
        o = F.scaled_dot_product_attention(
            qi, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[rows] = o.transpose(0, 1)
    return out


def paged_attention(
    q, k_new, v_new, k_cache, v_cache, batch: ForwardBatch, scale: float, causal: bool, sliding_window: int | None = None
) -> torch.Tensor:
    """Dispatch, every path equal to paged_attention_ref: decode rows (one query token each) go
    through the batched kernel in one call; a prompt's first chunk attends to its own fresh K/V
    (k_new/v_new [T, Hkv, D], already written to the cache) without reading the cache back; other
    chunks go through the reference."""
    if not causal:
        return paged_attention_ref(q, k_cache, v_cache, batch, scale, causal)
    if batch.decode_only:
        plan = batch.memo(
            ("decode_gather", sliding_window, q.dtype),
            lambda: gather_plan(batch.block_tables, batch.context_lens, batch.block_size, sliding_window, q.dtype),
        )
        return decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale, sliding_window, plan)
    out = torch.empty_like(q)
    decode = [i for i, n in enumerate(batch.query_lens) if n == 1]
    if decode:
        rows = torch.tensor([batch.query_start[i] for i in decode], device=q.device)
        seqs = torch.tensor(decode, device=q.device)
        out[rows] = decode_attention(
            q[rows], k_cache, v_cache, batch.block_tables[seqs], batch.context_lens[seqs], scale, sliding_window
        )
    chunks = []
    for i, n in enumerate(batch.query_lens):
        if n == 1:
            continue
        if batch.num_computed[i] == 0 and sliding_window is None:
            rows = batch.seq_rows(i)
            qi, ki, vi = (t[rows].transpose(0, 1) for t in (q, k_new.to(q.dtype), v_new.to(q.dtype)))
            out[rows] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
        else:
            chunks.append(i)
    return paged_attention_ref(q, k_cache, v_cache, batch, scale, causal, sliding_window, seqs=chunks, out=out)


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's cache, then attends over everything cached."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        causal: bool = True,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.sliding_window = sliding_window
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.causal = causal
        self.k_cache: torch.Tensor | None = None  # bound by the engine: [num_blocks, block_size, Hkv, D]
        self.v_cache: torch.Tensor | None = None

    def cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_kv_heads, self.head_dim)

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        write_kv(self.k_cache, self.v_cache, k, v, batch.slot_mapping)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, batch, self.scale, self.causal, self.sliding_window)
        return out.reshape(T, self.num_heads * self.head_dim)
