"""gpu_check.py's first rows: each Triton kernel against its torch reference on the device, at the
27B's shapes (toy shapes with --smoke). Errors are max |kernel - reference|, and relative to the
reference's max |value| where the outputs are rounded (bf16) or accumulated in another order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp4serve.formats.kv_codec import KVCacheFormat, KVQuant
from fp4serve.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.layers.attention import paged_attention_ref, write_kv
from fp4serve.layers.gdn import chunk_gated_delta_rule, l2norm, recurrent_gated_delta_rule


def relative(got: torch.Tensor, want: torch.Tensor) -> str:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() or 1.0
    return f"max err {err:.2e} ({err / scale:.1e} of max)"


def gemm_rows(device: torch.device, smoke: bool) -> list[tuple[str, str, str]]:
    """NVFP4 W4A16 against dequantize + F.linear in bf16, at the 27B MLP's gate/up and down shapes."""
    from fp4serve.kernels.triton_nvfp4 import nvfp4_linear_triton

    shapes = [(64, 64)] if smoke else [(2 * 17408, 5120), (5120, 17408)]
    rows = []
    torch.manual_seed(0)
    for n, k in shapes:
        q = quantize_nvfp4(torch.randn(n, k, device=device) * 0.02)
        w = dequantize_nvfp4(q, torch.bfloat16)
        for m in (1, 16) if smoke else (1, 16, 256):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            got = nvfp4_linear_triton(x, q.packed, q.block_scale, q.global_scale)
            rows.append((f"NVFP4 GEMM {m}x{k} @ {n}x{k}^T, bf16", relative(got, F.linear(x, w)), "~4e-3 of max (bf16)"))
    return rows


def kv_rows(device: torch.device, smoke: bool) -> list[tuple[str, str, str]]:
    """The KV write (bytes that differ from write_kv's) and paged attention (error against
    paged_attention_ref) for each KV format, at the 27B's attention shapes (24 query heads, 4 KV
    heads of 256): a decode batch, prefill chunks after cached context, verification rows (1 + 3),
    a non-causal DFlash block of 16 and a sliding window."""
    from fp4serve.kernels.triton_attention import paged_attention_triton
    from fp4serve.kernels.triton_kv_write import write_kv_triton

    H, Hkv, D, block = (4, 2, 32, 16) if smoke else (24, 4, 256, 16)
    decode_seqs, context = (3, 40) if smoke else (64, 1024)
    torch.manual_seed(0)
    rows = []
    num_blocks = decode_seqs * (-(-(context + (100 if smoke else 600)) // block)) + 8
    free = torch.randperm(num_blocks).tolist()  # block tables with holes: ids in random order

    def seqs(specs):
        """SequenceRows for (cached tokens, new tokens, drafts) each, blocks from the shuffled pool."""
        out, at = [], 0
        for cached, new, drafts in specs:
            need = -(-(cached + new) // block)
            out.append(SequenceRows([0] * new, cached, free[at : at + need], num_drafts=drafts))
            at += need
        return out

    cached, chunk, window = (48, 32, 16) if smoke else (512, 256, 128)
    workloads = {
        f"decode {decode_seqs} seqs x {context} ctx": (seqs([(context, 1, 0)] * decode_seqs), True, None),
        f"prefill 2 x {chunk} after {cached} cached": (seqs([(cached, chunk, 0)] * 2), True, None),
        "verification 8 seqs x (1 + 3)": (seqs([(context, 4, 3)] * 8), True, None),
        "DFlash block 16, non-causal": (seqs([(context, 16, 0)] * 4), False, None),
        f"sliding window {window}, prefill {chunk}": (seqs([(chunk, chunk, 0)] * 2), True, window),
    }
    for format_index, name in enumerate(("bfloat16", "fp8_e4m3", "nvfp4")):
        fmt = KVCacheFormat(name)
        kv = KVQuant(fmt, torch.tensor(0.05, device=device), torch.tensor(0.04, device=device))
        shape = (num_blocks, block, Hkv, fmt.row_width(D))
        k_cache = torch.zeros(shape, dtype=fmt.storage_dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        # fill every block once, through the reference write (the attention inputs)
        slots = torch.arange(num_blocks * block, device=device)
        k_all = torch.randn(len(slots), Hkv, D, device=device, dtype=torch.bfloat16)
        v_all = torch.randn_like(k_all)
        write_kv(k_cache, v_cache, k_all, v_all, slots, kv)
        # the KV write: a random subset of the tokens, through both writes into empty caches
        some = torch.randperm(len(slots), device=device)[: 256 if smoke else 16384]
        written = []
        for write in (write_kv, write_kv_triton):
            caches = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
            write(*caches, k_all[some], v_all[some], slots[some], kv)
            written.append(torch.cat([c.view(torch.uint8).flatten() for c in caches]))
        differ = int((written[0] != written[1]).sum())
        rows.append((f"KV write {name}, {len(some)} tokens", f"{differ} of {written[0].numel()} bytes differ", "0"))
        for workload_index, (workload, (specs, causal, window)) in enumerate(workloads.items()):
            if smoke and workload_index % 3 != format_index:  # --smoke: each workload with one format
                continue
            batch = build_batch(specs, block, device)
            q = torch.randn(batch.num_tokens, H, D, device=device, dtype=torch.bfloat16)
            want = paged_attention_ref(q, k_cache, v_cache, batch, D**-0.5, causal, window, kv=kv)
            got = paged_attention_triton(q, k_cache, v_cache, batch.query_start_loc, batch.context_lens,
                                         batch.block_tables, max(batch.query_lens), D**-0.5, causal, window, kv)  # fmt: skip
            rows.append((f"attention {workload}, {name} KV", relative(got, want), "~1e-2 of max (bf16)"))
    return rows


def gdn_rows(device: torch.device, smoke: bool) -> list[tuple[str, str, str]]:
    from fp4serve.kernels import fla_gdn
    from fp4serve.kernels.triton_gdn import fused_recurrent_gated_delta_rule, prefill_gated_delta_rule

    Hk, Hv, dk, dv = (2, 4, 16, 16) if smoke else (16, 48, 128, 128)
    batch, prompt = (3, 40) if smoke else (64, 2048)
    torch.manual_seed(0)

    def inputs(B, T):
        q = l2norm(torch.randn(B, T, Hk, dk, device=device))
        k = l2norm(torch.randn(B, T, Hk, dk, device=device))
        v = torch.randn(B, T, Hv, dv, device=device)
        g = -torch.rand(B, T, Hv, device=device) * 0.5
        beta = torch.rand(B, T, Hv, device=device)
        return q, k, v, g, beta

    rows = []
    state = torch.randn(batch, Hv, dk, dv, device=device) * 0.1
    slots = torch.arange(batch, device=device)
    not_fresh = torch.zeros(batch, dtype=torch.bool, device=device)
    for name, T in (("decode", 1), ("verification 1+3", 4)):
        q, k, v, g, beta = inputs(batch, T)
        cache = state.clone()
        states = torch.empty(batch, T, Hv, dk, dv, device=device) if T > 1 else None
        out = fused_recurrent_gated_delta_rule(q, k, v, g, beta, cache, slots, not_fresh, states_out=states)
        want, final = recurrent_gated_delta_rule(q, k, v, g, beta, state)
        rows.append((f"GDN {name}, {batch} seqs, fp32", f"{relative(out, want)}; state {relative(cache, final)}", ""))
    q, k, v, g, beta = inputs(1, prompt)
    cache = state[:1].clone()
    fresh = torch.ones(1, dtype=torch.bool, device=device)
    cu_seqlens = torch.tensor([0, prompt], device=device)
    out = prefill_gated_delta_rule(q, k, v.bfloat16(), g, beta, cache, slots[:1], fresh, cu_seqlens)
    want, final = chunk_gated_delta_rule(q, k, v.bfloat16().float(), g, beta)
    path = "fla-core chunked" if fla_gdn.usable(q) else "recurrent kernel (no fla)"
    rows.append((f"GDN prefill {prompt} tokens, bf16 v, {path}", f"{relative(out, want)}; state {relative(cache, final)}",
                 "~1e-2 of max (bf16 output)"))  # fmt: skip
    return rows


def kernel_rows(device: torch.device, smoke: bool) -> list[tuple[str, str, str]]:
    return gemm_rows(device, smoke) + kv_rows(device, smoke) + gdn_rows(device, smoke)

