"""The gated delta rule on the GPU, states read and written in place in the layer's state cache.

`fused_recurrent_gated_delta_rule` runs the rule token by token (layers/gdn.py's
recurrent_gated_delta_rule): decode (1 token), speculative verification (1 + k tokens, optionally
keeping the state after every token) and, where fla-core's chunked kernels cannot run, prefill
chunks. `prefill_gated_delta_rule` is what the layer calls for all prefill chunks of a step:
fla-core's chunked kernels on CUDA (kernels/fla_gdn.py), else the recurrent kernel.

One program per (sequence, value head, dv tile): the state's dv columns evolve independently
(u_j = beta (v_j - sum_i S_ij k_i), S_ij += k_i u_j), so a [dk, BLOCK_V] tile of the state lives in
registers for all the sequence's tokens and touches memory twice, once read and once written. q and
k arrive L2-normalised by the caller; all arithmetic is fp32.

Nothing in the launch reads device values on the host, so decode steps can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4serve.kernels.triton_codecs import TL_DTYPES, to_stored
from fp4serve.kernels.triton_support import emulate_bf16

# fla-core's choice for its own fused recurrent kernel: a narrow tile keeps the dk x BLOCK_V state in
# one warp's registers for dk up to 128, and gives dv / 8 programs per head to fill the GPU at decode.
BLOCK_V_MAX = 8

@triton.jit
def _fused_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr,
    state_ptr, slots_ptr, fresh_ptr, cu_seqlens_ptr, out_ptr, states_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_bt,
    stride_slot, T, scale,
    HV: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    VARLEN: tl.constexpr, STORE_STATES: tl.constexpr, OUT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    seq, head, v_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    key_head = head // (HV // HK)
    if VARLEN:
        first = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    else:
        first = seq.to(tl.int64) * T
        end = first + T
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = v_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    mask_state = mask_k[:, None] & mask_v[None, :]
    tile = head * DK * DV + offs_k[:, None] * DV + offs_v[None, :]  # within one [Hv, dk, dv] state

    slot = tl.load(slots_ptr + seq).to(tl.int64)
    state_tile = state_ptr + slot * stride_slot + tile
    state = tl.load(state_tile, mask=mask_state, other=0.0)
    # a fresh sequence's slot may hold a previous owner's state (even NaN): select, never multiply
    state = tl.where(tl.load(fresh_ptr + seq) != 0, 0.0, state)

    for t in range(first, end):
        q = tl.load(q_ptr + t * stride_qt + key_head * stride_qh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + t * stride_kt + key_head * stride_kh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt + head * stride_vh + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(g_ptr + t * stride_gt + head).to(tl.float32))
        beta = tl.load(beta_ptr + t * stride_bt + head).to(tl.float32)
        state = state * decay
        update = beta * (v - tl.sum(state * k[:, None], axis=0))  # beta (v - S'^T k)
        state = state + k[:, None] * update[None, :]
        out = tl.sum(state * (q * scale)[:, None], axis=0)  # S^T (q dk^-0.5)
        out_offs = t * HV * DV + head * DV + offs_v
        tl.store(out_ptr + out_offs, to_stored(out, OUT_DTYPE, EMULATE_BF16), mask=mask_v)
        if STORE_STATES:
            tl.store(states_out_ptr + t * HV * DK * DV + tile, state, mask=mask_state)
    tl.store(state_tile, state, mask=mask_state)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ...] -> [B*T, H, ...] with unit stride in the last dim (the kernel indexes rows)."""
    x = x.reshape(-1, *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_cache: torch.Tensor,
    state_slots: torch.Tensor,
    fresh: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    states_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The delta rule token by token for B sequences, each state read from and written back to
    state_cache [slots, Hv, dk, dv] (fp32) at state_slots [B] (long), zeros where fresh [B] (bool or
    int) is set.

    q, k [B, T, Hk, dk] (L2-normalised), v [B, T, Hv, dv], g (log decay) and beta [B, T, Hv]; any
    float dtypes. Without cu_seqlens the B sequences have T tokens each; with it (long [N + 1], as
    fla-core's), B = 1 and sequence n owns tokens cu_seqlens[n]:cu_seqlens[n+1]. states_out
    [B, T, Hv, dk, dv] fp32 (contiguous), when given, receives the state after every token.
    Returns out [B, T, Hv, dv] in v.dtype (fp32 values rounded once, as the torch path casts)."""
    B, T, Hk, dk = k.shape
    Hv, dv = v.shape[2:]
    num_seqs = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if state_cache.dtype != torch.float32 or not state_cache[0].is_contiguous():
        raise ValueError("the state cache must be fp32 with contiguous [Hv, dk, dv] slots")
    if states_out is not None and not states_out.is_contiguous():
        raise ValueError("states_out must be contiguous")
    q, k, v, g, beta = (_tokens(x) for x in (q, k, v, g, beta))
    out = torch.empty(B * T, Hv, dv, dtype=v.dtype, device=v.device)
    block_v = min(BLOCK_V_MAX, triton.next_power_of_2(dv))
    grid = (num_seqs, Hv, triton.cdiv(dv, block_v))
    _fused_recurrent_kernel[grid](
        q, k, v, g, beta,
        state_cache, state_slots, fresh, cu_seqlens if cu_seqlens is not None else state_slots, out,
        states_out if states_out is not None else out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), beta.stride(0),
        state_cache.stride(0), T, dk**-0.5,
        HV=Hv, HK=Hk, DK=dk, DV=dv, BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=block_v,
        VARLEN=cu_seqlens is not None, STORE_STATES=states_out is not None,
        OUT_DTYPE=TL_DTYPES[v.dtype], EMULATE_BF16=emulate_bf16(),
        num_warps=1,
    )  # fmt: skip
    return out.view(B, T, Hv, dv)


def prefill_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_cache: torch.Tensor,
    state_slots: torch.Tensor,
    fresh: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """All prefill chunks of a step in one call: inputs [1, N, ...] laid end to end as cu_seqlens
    says, otherwise as fused_recurrent_gated_delta_rule. fla-core's chunked kernels where they run
    (CUDA, not the interpreter, fla installed), else the recurrent kernel (exact, slower)."""
    from fp4serve.kernels import fla_gdn

    rule = fla_gdn.chunk_prefill if fla_gdn.usable(v) else fused_recurrent_gated_delta_rule
    return rule(q, k, v, g, beta, state_cache, state_slots, fresh, cu_seqlens=cu_seqlens)
