"""Prefill through fla-core's chunked gated-delta-rule kernels (`pip install fla-core`, module `fla`).

Imported lazily: fla is optional, and its kernels are autotuned, which Triton's interpreter cannot
run ("0 active drivers"), so on CPU, under the interpreter or without fla, prefill takes
triton_gdn's recurrent kernel instead (triton_gdn.prefill_gated_delta_rule decides).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from fp4serve.kernels.triton_support import interpreting


@functools.cache
def fla_importable() -> bool:
    return importlib.util.find_spec("fla") is not None


def usable(t: torch.Tensor) -> bool:
    """fla's kernels can run on t's device."""
    return t.is_cuda and not interpreting() and fla_importable()


def chunk_prefill(
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
    """triton_gdn.prefill_gated_delta_rule's contract, on fla: q, k [1, N, Hk, dk] (L2-normalised),
    v [1, N, Hv, dv], g, beta [1, N, Hv], sequences as cu_seqlens [S + 1] (long) says; each sequence's
    state is gathered from state_cache at state_slots [S] (zeros where fresh), and its final state
    written back. Returns out [1, N, Hv, dv] in v.dtype.

    fla takes grouped heads itself (value head h reads key head h // (Hv / Hk), as ours), so q and k
    are not expanded; they are cast to v's dtype because fla's tensor-core dots take one input dtype."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    initial = state_cache[state_slots]  # a gathered copy: fla reads [S, Hv, dk, dv] contiguous
    initial = torch.where(fresh.view(-1, 1, 1, 1).bool(), 0.0, initial)
    out, final = chunk_gated_delta_rule(
        q.to(v.dtype),
        k.to(v.dtype),
        v,
        g.float(),
        beta.to(v.dtype),
        scale=k.shape[-1] ** -0.5,
        initial_state=initial,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
    )
    state_cache[state_slots] = final.float()
    return out.to(v.dtype)
