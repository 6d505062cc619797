"""Paged attention over a block-table KV cache.

`paged_attention_ref` is the reference: one sequence at a time, K/V gathered from the cache
through the block table and decoded (formats/kv_codec.py: plain, fp8 or nvfp4 storage), plain SDPA
with a causal offset mask. Fast paths in kernels/ must match it. Where the Triton kernels run
(kernels/triton_support.py), PagedAttention hands the KV write and all the step's rows to
kernels/triton_kv_write.py and kernels/triton_attention.py instead of `paged_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.formats.kv_codec import KVCacheFormat, KVQuant
from fp4serve.forward_batch import ForwardBatch
from fp4serve.kernels.paged_attention import decode_attention, gather_plan
from fp4serve.kernels.triton_support import use_triton
from fp4serve.layers.cache_spec import KVCacheSpec


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    kv: KVQuant | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode k, v [T, Hkv, D] (kv: the storage format and scales; default plain in the cache
    dtype) and store them at flat slots of caches shaped [num_blocks, block_size, Hkv, row_width].
    Returns the stored rows."""
    kv = kv or KVQuant.plain(k_cache.dtype)
    k_stored, v_stored = kv.encode(k, v)
    for cache, rows in ((k_cache, k_stored), (v_cache, v_stored)):
        if cache.dtype == torch.float8_e4m3fn:  # torch has no fp8 index_copy_ on CPU: copy the bytes
            cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, rows)
    return k_stored, v_stored


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, as stored: [length, Hkv, row_width]."""
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
    kv: KVQuant | None = None,
) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D] for the sequences `seqs` (default all), written into `out`.
    Token j of a sequence with c cached tokens before this step sees cache positions [0, c + j]
    (causal) or the whole context (non-causal). kv decodes the stored rows (default: plain)."""
    out = torch.empty_like(q) if out is None else out
    kv = kv or KVQuant.plain(k_cache.dtype)
    for i in range(batch.num_seqs) if seqs is None else seqs:
        rows = batch.seq_rows(i)
        ctx = int(batch.context_lens[i])
        k = kv.decode_k(gather_kv(k_cache, batch.block_tables[i], ctx), q.dtype)
        v = kv.decode_v(gather_kv(v_cache, batch.block_tables[i], ctx), q.dtype)
        qi = q[rows].transpose(0, 1)  # [H, q, D]
        mask = None
        if causal:
            q_pos = torch.arange(batch.num_computed[i], ctx, device=q.device)
            k_pos = torch.arange(ctx, device=q.device)
            mask = q_pos[:, None] >= k_pos[None, :]
            if sliding_window is not None:  # transformers: key visible while q_pos - k_pos < window
                mask &= q_pos[:, None] - k_pos[None, :] < sliding_window
        # 4-D [1, H, q, D]: torch's CPU flash kernel takes only batched inputs (3-D ones fall back
        # to the math path, which is 5x slower on a 2048-token chunk)
        o = F.scaled_dot_product_attention(
            qi[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[rows] = o[0].transpose(0, 1)
    return out


def paged_attention(
    q,
    k_new,
    v_new,
    k_cache,
    v_cache,
    batch: ForwardBatch,
    scale: float,
    causal: bool,
    sliding_window: int | None = None,
    kv: KVQuant | None = None,
) -> torch.Tensor:
    """Dispatch, every path equal to paged_attention_ref: decode rows (one query token each) go
    through the batched kernel in one call; a prompt's first chunk attends to its own fresh K/V
    (k_new/v_new [T, Hkv, row_width], the rows as stored in the cache) without gathering the cache;
    other chunks go through the reference."""
    kv = kv or KVQuant.plain(k_cache.dtype)
    if not causal:
        return paged_attention_ref(q, k_cache, v_cache, batch, scale, causal, kv=kv)
    if batch.decode_only:
        plan = batch.memo(
            ("decode_gather", sliding_window, q.dtype),
            lambda: gather_plan(batch.block_tables, batch.context_lens, batch.block_size, sliding_window, q.dtype),
        )
        return decode_attention(
            q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale, sliding_window, plan, kv
        )
    out = torch.empty_like(q)
    decode = [i for i, n in enumerate(batch.query_lens) if n == 1]
    if decode:
        rows = torch.tensor([batch.query_start[i] for i in decode], device=q.device)
        seqs = torch.tensor(decode, device=q.device)
        out[rows] = decode_attention(
            q[rows], k_cache, v_cache, batch.block_tables[seqs], batch.context_lens[seqs], scale, sliding_window, kv=kv
        )
    chunks = []
    for i, n in enumerate(batch.query_lens):
        if n == 1:
            continue
        if batch.num_computed[i] == 0 and sliding_window is None:
            rows = batch.seq_rows(i)
            # Decode the stored rows rather than use the unquantized K/V: with an fp8 or nvfp4
            # cache the prompt then attends to exactly the values a later step reads back, so a
            # token's result does not depend on whether its context was computed in this step or
            # came from the cache (prefix-cache hits, chunked prefill, speculative verification).
            ki, vi = kv.decode_k(k_new[rows], q.dtype), kv.decode_v(v_new[rows], q.dtype)
            qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[rows], ki, vi))  # 4-D: the flash kernel (above)
            out[rows] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)[
                0
            ].transpose(0, 1)
        else:
            chunks.append(i)
    return paged_attention_ref(q, k_cache, v_cache, batch, scale, causal, sliding_window, seqs=chunks, out=out, kv=kv)


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's cache, then attends over everything cached.

    k_scale / v_scale are the per-tensor scales of an fp8 or nvfp4 cache: 1.0 by default, set by
    `load_kv_scale` from a checkpoint, or from the amax of a forward whose batch asks for it
    (`ForwardBatch.calibrate_kv_scales`: the engine's first, with --calculate-kv-scales)."""

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
        self.k_cache: torch.Tensor | None = None  # bound by the engine: [num_blocks, block_size, Hkv, row_width]
        self.v_cache: torch.Tensor | None = None
        # Buffers, not parameters: a checkpoint may or may not carry them (the strict loader
        # requires every parameter). Explicit float32: the model is built under its own dtype.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.loaded_scales: set[str] = set()  # "k", "v": the scales a checkpoint provided
        self.kv: KVQuant | None = None

    def cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_kv_heads, self.head_dim)

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_format: KVCacheFormat | None = None) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache
        kv_format = kv_format or KVCacheFormat.plain(k_cache.dtype)
        self.kv = KVQuant(kv_format, self.k_scale, self.v_scale)

    def load_kv_scale(self, which: str, value: torch.Tensor) -> None:
        """A checkpoint's k_scale or v_scale (which: "k" or "v")."""
        (self.k_scale if which == "k" else self.v_scale).copy_(value.reshape(()))
        self.loaded_scales.add(which)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if batch.calibrate_kv_scales:
            self.k_scale.copy_(self.kv.format.scale_for_amax(k.abs().amax()))
            self.v_scale.copy_(self.kv.format.scale_for_amax(v.abs().amax()))
        if use_triton(q):
            return self._forward_triton(q, k, v, batch).reshape(T, self.num_heads * self.head_dim)
        k_stored, v_stored = write_kv(self.k_cache, self.v_cache, k, v, batch.slot_mapping, self.kv)
        out = paged_attention(
            q,
            k_stored,
            v_stored,
            self.k_cache,
            self.v_cache,
            batch,
            self.scale,
            self.causal,
            self.sliding_window,
            self.kv,
        )
        return out.reshape(T, self.num_heads * self.head_dim)

    def _forward_triton(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The KV write, then one attention launch for all rows, from the batch's device tensors and
        host ints only (capturable in a CUDA graph). Imported here: triton is an optional dependency."""
        from fp4serve.kernels.triton_attention import paged_attention_triton
        from fp4serve.kernels.triton_kv_write import write_kv_triton

        write_kv_triton(self.k_cache, self.v_cache, k, v, batch.slot_mapping, self.kv)
        return paged_attention_triton(
            q,
            self.k_cache,
            self.v_cache,
            batch.query_start_loc,
            batch.context_lens,
            batch.block_tables,
            max(batch.query_lens),
            self.scale,
            self.causal,
            self.sliding_window,
            self.kv,
        )
