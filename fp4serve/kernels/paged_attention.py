"""Batched decode attention: every one-token query of a step in one call.

On CPU with a 16/32-bit cache, C code (cpu_decode.c `paged_decode_attention`) reads each
sequence's blocks in place. Otherwise (CUDA, fp8/nvfp4 caches, FP4SERVE_CPU_DECODE=torch) the torch
path: decode steps dominate serving, and looping over 32 sequences per layer costs more in Python
than the math, so rows are gathered into a padded [B, Hkv, max_ctx, D] view with a length mask. Plain
matmuls rather than SDPA: torch's CPU SDPA kernel is tuned for long queries and is ~4x slower for
one-token queries in bf16. fp8 and nvfp4 caches are decoded after the gather, so only the blocks a
step reads are dequantized. Tested against layers.attention.paged_attention_ref."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp4serve.formats.kv_codec import KVQuant
from fp4serve.kernels.cpu_build import cpu_library
from fp4serve.kernels.cpu_decode import c_decode_enabled

# Up to this many sequences torch's SDPA is fastest (its transposes are tiny); beyond, its CPU
# kernel, tuned for long queries, falls behind per-KV-head batched matmuls by 3-8x.
SDPA_MAX_BATCH = 4


def gather_plan(block_tables, context_lens, block_size: int, sliding_window=None, dtype=torch.float32):
    """The blocks [B * n] holding each sequence's context (whole blocks: copying 16 tokens at a
    time is cheaper than token slots), and an additive mask [B, 1, n * block_size] (0, or -inf for
    padding and out-of-window positions). The same for every layer of a step."""
    num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    blocks = block_tables[:, :num_blocks].contiguous()
    pos = torch.arange(num_blocks * block_size, device=block_tables.device)
    hidden = pos[None, :] >= context_lens[:, None]
    if sliding_window is not None:
        hidden |= pos[None, :] <= context_lens[:, None] - 1 - sliding_window
    bias = torch.zeros(hidden.shape, dtype=dtype, device=block_tables.device).masked_fill_(hidden, float("-inf"))
    return blocks.view(-1), bias[:, None, :]


def decode_attention(
    q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None, plan=None, kv: KVQuant | None = None
) -> torch.Tensor:
    """q [B, H, D], one query per sequence at its last context position -> [B, H, D].
    `plan` is gather_plan(...) for these arguments, when the caller caches it across layers.
    `kv` decodes the stored rows (fp8, nvfp4; default plain): only the gathered blocks are decoded."""
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    group = H // Hkv
    kv = kv or KVQuant.plain(k_cache.dtype)
    lib = _c_attention_library(q, k_cache, kv)
    if lib is not None:
        return _c_decode_attention(lib, q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
    blocks, bias = plan or gather_plan(block_tables, context_lens, k_cache.shape[1], sliding_window, q.dtype)
    max_ctx = bias.shape[-1]
    # index_select, not advanced indexing: the latter is much slower on CPU for this gather.
    k = kv.decode_k(k_cache.index_select(0, blocks), q.dtype).view(B, max_ctx, Hkv, D)
    v = kv.decode_v(v_cache.index_select(0, blocks), q.dtype).view(B, max_ctx, Hkv, D)
    if B <= SDPA_MAX_BATCH:
        mask = bias[:, None]  # [B, 1, 1, ctx]
        o = F.scaled_dot_product_attention(
            q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
        )
        return o[:, :, 0]
    qg = q.view(B, Hkv, group, D)  # query heads grouped by the KV head they share
    out = torch.empty(Hkv, B, group, D, dtype=q.dtype, device=q.device)
    # One KV head at a time: k[:, :, h] is a strided [B, ctx, D] view that bmm reads in place,
    # where a [B, Hkv, ctx, D] transpose would first copy the whole gathered context.
    for h in range(Hkv):
        # Scores in the model dtype, softmax in fp32, as transformers' eager attention does.
        scores = torch.baddbmm(bias, qg[:, h], k[:, :, h].transpose(1, 2), alpha=scale)  # [B, group, ctx]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        torch.bmm(probs, v[:, :, h], out=out[h])
    return out.permute(1, 0, 2, 3).reshape(B, H, D)


def _c_attention_library(q, k_cache, kv: KVQuant):
    """The C kernels, where they read this cache in place: CPU, K/V stored plain in bf16 or fp32;
    None otherwise, or with FP4SERVE_CPU_DECODE=torch."""
    if q.device.type != "cpu" or kv.format.quantized or k_cache.dtype not in (torch.bfloat16, torch.float32):
        return None
    return cpu_library() if c_decode_enabled() else None


def _c_decode_attention(lib, q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window):
    """decode_attention in C: every (sequence, head) reads its blocks in place, no gather copy;
    scores, softmax and the weighted sum in fp32 (the torch path rounds scores to q's dtype)."""
    B, H, D = q.shape
    qf = q.float().contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    status = lib.paged_decode_attention(
        qf.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        int(k_cache.dtype == torch.bfloat16),
        tables.data_ptr(),
        tables.shape[1],
        lens.data_ptr(),
        B,
        H,
        k_cache.shape[2],
        D,
        k_cache.shape[1],
        scale,
        sliding_window or 0,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("decode attention: no memory for the score buffers")
    return out.to(q.dtype)
