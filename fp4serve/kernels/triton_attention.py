"""Paged attention on the GPU: every query row of a step in one launch (layers/attention.py's
paged_attention_ref is the truth).

Rows of all kinds share the launch: decode rows (1 token), prefill chunks with or without cached
context, speculative verification rows (1 + k tokens); causal (optionally a sliding window: a key is
visible while q_pos - k_pos < window) or not (DFlash drafter blocks see the whole context). Token j of
a sequence with c tokens cached before this step sits at position c + j; its context is
context_lens[i] = c + query_len tokens, this step's K/V included (written to the cache first, by
kernels/triton_kv_write.py).

Grid (query tiles, KV heads, splits). A program takes BLOCK_Q consecutive query tokens of one
sequence and all GROUP query heads that share its KV head, as the BLOCK_M = BLOCK_Q * GROUP rows of
one tile (row m: token m // GROUP, head m % GROUP), so each KV tile is read and decoded once per KV
head and feeds a tensor-core dot of height >= 16 even for a decode row (GROUP heads, the rest
masked). The query tiles are numbered as in vLLM's unified Triton attention: sequence i's tiles start
at query_start_loc[i] // BLOCK_Q + i, so T // BLOCK_Q + num_seqs programs cover any batch and each
finds its sequence by a binary search over query_start_loc, all on the device. Programs past a
sequence's last tile return at once.

Decode steps (every row one token) that would leave the GPU's SMs idle also split each row's keys
over `num_splits` programs (flash-decoding): each writes its unnormalised fp32 sum with its running
max and total, and `_combine_splits_kernel` rescales and adds them per (token, head).

Per program: keys in tiles of BLOCK_N positions, gathered through the block table position by
position (so BLOCK_N does not depend on the cache's block size) and decoded in registers as
formats/kv_codec.py decodes them (fp32 value * per-layer scale, then the model dtype): plain, E4M3
bytes (fp8_e4m3), or E2M1 nibbles with their E4M3 block scale (nvfp4). q.k and p.v are tl.dot in
the model dtype with fp32 accumulation; online softmax in fp32 (exp2, the scale folded in). Only
keys some row of the tile can see are visited (causal: up to the tile's last position; sliding
window: from its first visible one).

Launch inputs are the ForwardBatch's device tensors and Python ints: nothing is read back to the
host, so decode steps can be captured in CUDA graphs.

Not measured: speed (no GPU here); the tile sizes are a first guess, not tuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4serve.formats.kv_codec import KVQuant
from fp4serve.kernels.triton_codecs import TL_DTYPES, e2m1_value, e4m3_value, to_dot_operand, to_stored
from fp4serve.kernels.triton_kv_write import FORMAT_CODES, FP8, NVFP4, PLAIN
from fp4serve.kernels.triton_support import emulate_bf16, sm_count

LOG2_E = 1.4426950408889634
PROGRAMS_PER_SM = 2
MAX_SPLITS = 16
INTERPRETER_SMS = 16


@triton.jit
def _decoded_tile(rows, cols, mask, scale, D: tl.constexpr, FORMAT: tl.constexpr):
    """Stored rows (pointers [N, 1]) at columns cols [1, BLOCK_D] -> fp32 values, as kv_codec decodes."""
    if FORMAT == NVFP4:  # D/2 code bytes (even element in the low nibble), then D/16 block-scale bytes
        byte = tl.load(rows + cols // 2, mask=mask, other=0).to(tl.int32)
        block_scale = tl.load(rows + D // 2 + cols // 16, mask=mask, other=0).to(tl.int32)
        return e2m1_value((byte >> ((cols % 2) * 4)) & 15) * (e4m3_value(block_scale) * scale)
    elif FORMAT == FP8:
        return e4m3_value(tl.load(rows + cols, mask=mask, other=0).to(tl.int32)) * scale
    else:
        return tl.load(rows + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr,
    k_scale_ptr, v_scale_ptr, partial_m_ptr, partial_l_ptr, partial_acc_ptr, qk_scale_log2, num_seqs, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table, stride_block, stride_slot, stride_head,
    T, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, CAUSAL: tl.constexpr, SLIDING: tl.constexpr, FORMAT: tl.constexpr,
    DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    q_tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # the last sequence whose first tile number (query_start_loc[i] // BLOCK_Q + i) is <= q_tile
    # int32 scalars from the start: loop-carried values must keep one type when compiled (num_seqs == 1
    # arrives as a constexpr)
    lo = tl.zeros((), dtype=tl.int32)
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        starts_before = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid)
    seq = lo
    q_first = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_first
    tile = q_tile - (q_first // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    cached = ctx - q_len

    m = tl.arange(0, BLOCK_M)
    token = tile * BLOCK_Q + m // GROUP
    head = kv_head * GROUP + m % GROUP
    row_valid = (m < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = cached + token
    cols = tl.arange(0, BLOCK_D)[None, :]
    col_valid = cols < D
    q_rows = q_ptr + (q_first + token).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_rows + cols, mask=row_valid[:, None] & col_valid, other=0.0).to(tl.float32)
    q = to_dot_operand(q, DTYPE, EMULATE_BF16)

    if CAUSAL:  # the keys some row of this tile sees
        k_end = cached + tl.minimum((tile + 1) * BLOCK_Q, q_len)
        k_start = 0
        if SLIDING:
            k_start = tl.maximum(cached + tile * BLOCK_Q - window + 1, 0)
    else:
        k_start, k_end = 0, ctx
    if NUM_SPLITS > 1:  # this program's share of those keys, in whole tiles
        span = tl.cdiv(tl.cdiv(k_end - k_start, NUM_SPLITS), BLOCK_N) * BLOCK_N
        k_start = k_start + split * span
        k_end = tl.minimum(k_start + span, k_end)
    k_scale, v_scale = 1.0, 1.0
    if FORMAT != PLAIN:
        k_scale, v_scale = tl.load(k_scale_ptr), tl.load(v_scale_ptr)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(k_start, k_end, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_valid = k_pos < k_end
        block = tl.load(table + k_pos // CACHE_BLOCK, mask=k_valid, other=0).to(tl.int64)
        offset = block * stride_block + (k_pos % CACHE_BLOCK) * stride_slot + kv_head * stride_head
        kv_mask = k_valid[:, None] & col_valid
        k = _decoded_tile(k_cache_ptr + offset[:, None], cols, kv_mask, k_scale, D, FORMAT)
        v = _decoded_tile(v_cache_ptr + offset[:, None], cols, kv_mask, v_scale, D, FORMAT)
        k = to_dot_operand(k, DTYPE, EMULATE_BF16)
        v = to_dot_operand(v, DTYPE, EMULATE_BF16)
        # "ieee": fp32 operands stay fp32 (the GPU default is tf32); 16-bit operands ignore it
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2  # [BLOCK_M, BLOCK_N], log2 units
        visible = row_valid[:, None] & k_valid[None, :]
        if CAUSAL:
            visible &= k_pos[None, :] <= q_pos[:, None]
            if SLIDING:
                visible &= q_pos[:, None] - k_pos[None, :] < window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with nothing visible yet keeps m = -inf: subtract 0 there, not -inf (NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = tl.dot(to_dot_operand(p, DTYPE, EMULATE_BF16), v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS > 1:  # unnormalised, with the running max and sum: _combine_splits_kernel finishes
        part = (split * T + q_first + token).to(tl.int64) * H + head  # [NUM_SPLITS, T, H] row index
        tl.store(partial_m_ptr + part, m_i, mask=row_valid)
        tl.store(partial_l_ptr + part, l_i, mask=row_valid)
        tl.store(partial_acc_ptr + part[:, None] * D + cols, acc, mask=row_valid[:, None] & col_valid)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_rows = out_ptr + (q_first + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_rows + cols, to_stored(out, DTYPE, EMULATE_BF16), mask=row_valid[:, None] & col_valid)


@triton.jit
def _combine_splits_kernel(
    partial_m_ptr, partial_l_ptr, partial_acc_ptr, out_ptr, T, stride_ot, stride_oh,
    H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    """One (token, head): the splits' partial softmax sums, rescaled to their common max, added."""
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    part = (tl.arange(0, NUM_SPLITS) * T + token) * H + head
    m = tl.load(partial_m_ptr + part)
    top = tl.max(m, axis=0)
    weight = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # a split that saw no key: weight 0
    total = tl.sum(tl.load(partial_l_ptr + part) * weight, axis=0)
    cols = tl.arange(0, BLOCK_D)
    acc = tl.load(partial_acc_ptr + part[:, None] * D + cols[None, :], mask=cols[None, :] < D, other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + cols, to_stored(out, DTYPE, EMULATE_BF16), mask=cols < D)


def launch_config(max_query_len: int, group: int, head_dim: int) -> dict:
    """Tiles, without autotuning (which needs a GPU, and would compile per shape at serving time).

    BLOCK_M, the rows of a tile, is >= 16 (tensor-core tile height) and holds a whole group of query
    heads: 16 when the step only decodes (one token: the group, padded), else 64 (BLOCK_Q = 64 / group
    tokens, amortising each KV tile over more queries). BLOCK_N = 64 keys (32 for head_dim > 128, so a
    tile of K and one of V stay within registers and shared memory)."""
    block_m = max(16 if max_query_len == 1 else 64, triton.next_power_of_2(group))
    return {
        "BLOCK_M": block_m,
        "BLOCK_Q": block_m // group,
        "BLOCK_N": 64 if head_dim <= 128 else 32,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
    }


def num_splits(max_query_len: int, programs: int, device: torch.device) -> int:
    """How many programs share each decode row's keys (flash-decoding): a decode step is memory bound
    and, at small batches, has far fewer (row tile, KV head) programs than the GPU has SMs. Context
    lengths are on the device only, so the count follows from the grid: a power of two (for the
    combining kernel's tile) that brings it to PROGRAMS_PER_SM per SM, at most MAX_SPLITS. Splits past
    a short context find no keys and cost one early exit. Steps with longer rows have programs enough."""
    target = PROGRAMS_PER_SM * sm_count(device, INTERPRETER_SMS)  # a small nominal GPU: small test grids
    if max_query_len > 1 or programs >= target:
        return 1
    return min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(target, programs)))


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    causal: bool,
    sliding_window: int | None = None,
    kv: KVQuant | None = None,
) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D] in q's dtype, equal to paged_attention_ref over the same batch.

    query_start_loc [B + 1]: sequence i owns rows [loc[i], loc[i+1]); context_lens [B]: cached tokens
    plus this step's; block_tables [B, max_blocks] (padding entries are never read); max_query_len:
    max(batch.query_lens), a host int (it picks the tiles). Caches [num_blocks, block_size, Hkv,
    row_width] in kv's format (default: plain in the cache dtype), already holding this step's K/V."""
    kv = kv or KVQuant.plain(k_cache.dtype)
    T, H, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    if T == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    fmt = FORMAT_CODES.get(kv.format.name, PLAIN)
    if fmt == FP8:  # read as bytes (triton_codecs.py: no fp8 dtypes in kernels)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_scale, v_scale = (kv.k_scale, kv.v_scale) if fmt != PLAIN else (context_lens, context_lens)
    config = launch_config(max_query_len, H // Hkv, D)
    num_seqs = query_start_loc.shape[0] - 1
    grid = (T // config["BLOCK_Q"] + num_seqs, Hkv)
    splits = num_splits(max_query_len, grid[0] * grid[1], q.device)
    partial_m = partial_l = partial_acc = out  # placeholders: one split writes no partial results
    if splits > 1:
        partial_m, partial_l = (torch.empty(splits, T, H, dtype=torch.float32, device=q.device) for _ in range(2))
        partial_acc = torch.empty(splits, T, H, D, dtype=torch.float32, device=q.device)
    _paged_attention_kernel[(*grid, splits)](
        q, k_cache, v_cache, out, block_tables, query_start_loc, context_lens, k_scale, v_scale,
        partial_m, partial_l, partial_acc, scale * LOG2_E, num_seqs, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        T, H=H, GROUP=H // Hkv, D=D, CACHE_BLOCK=k_cache.shape[1], **config, NUM_SPLITS=splits,
        CAUSAL=causal, SLIDING=causal and sliding_window is not None, FORMAT=fmt,
        DTYPE=TL_DTYPES[q.dtype], EMULATE_BF16=emulate_bf16(), num_warps=4,
    )  # fmt: skip
    if splits > 1:
        _combine_splits_kernel[(T, H)](
            partial_m, partial_l, partial_acc, out, T, out.stride(0), out.stride(1),
            H=H, D=D, BLOCK_D=config["BLOCK_D"], NUM_SPLITS=splits,
            DTYPE=TL_DTYPES[q.dtype], EMULATE_BF16=emulate_bf16(), num_warps=1,
        )  # fmt: skip
    return out
