"""Paged attention against plain dense attention over the unpaged K/V.

The dense oracle here is written from scratch (explicit GQA head mapping, masks built from
absolute positions, softmax in float64) so it shares no code with layers/attention.py. Each case
scatters every sequence's K/V over a shuffled set of cache blocks, fills every other cache slot
with large garbage (a read outside a sequence's context would show), and mixes fresh prefills,
prefill chunks that continue a cached prefix (num_computed > 0), and one-token decodes. The
dispatch `paged_attention` (batched decode kernel, fresh-prompt path on this step's own K/V,
reference for the rest) must equal both the reference and the oracle.
"""
from __future__ import annotations

import pytest
import torch
from conftest import paged_batch

from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.kernels.cpu_build import cpu_library
from fp4serve.kernels.paged_attention import decode_attention
from fp4serve.layers.attention import PagedAttention, gather_kv, paged_attention, paged_attention_ref, write_kv

H, HKV, D = 8, 2, 16
SCALE = D**-0.5


class Case:
    """Sequences given as (num_computed, query_len), laid out in a paged cache."""

    def __init__(self, shapes, block_size=4, dtype=torch.float32, seed=0, extra_blocks=5):
        g = torch.Generator().manual_seed(seed)
        self.shapes, self.dtype, self.block_size = shapes, dtype, block_size
        ctx_lens = [c + q for c, q in shapes]
        blocks_per_seq = [-(-n // block_size) for n in ctx_lens]
        num_blocks = sum(blocks_per_seq) + extra_blocks
        self.k_cache = (100 * torch.randn(num_blocks, block_size, HKV, D, generator=g)).to(dtype)
        self.v_cache = (100 * torch.randn(num_blocks, block_size, HKV, D, generator=g)).to(dtype)
        perm = torch.randperm(num_blocks, generator=g).tolist()
        self.tables, self.k, self.v = [], [], []
        slot_mapping, k_new, v_new = [], [], []
        for (computed, qlen), ctx, nb in zip(shapes, ctx_lens, blocks_per_seq):
            table, perm = perm[:nb], perm[nb:]
            k = torch.randn(ctx, HKV, D, generator=g).to(dtype)
            v = torch.randn(ctx, HKV, D, generator=g).to(dtype)
            slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
            write_kv(self.k_cache, self.v_cache, k, v, slots)
            self.tables.append(table)
            self.k.append(k)
            self.v.append(v)
            slot_mapping += slots[computed:].tolist()
            k_new.append(k[computed:])
            v_new.append(v[computed:])
        # This step's K/V rows [T, Hkv, D], already written to the cache like PagedAttention does.
        self.k_new, self.v_new = torch.cat(k_new), torch.cat(v_new)
        T = sum(q for _, q in shapes)
        self.q = torch.randn(T, H, D, generator=g).to(dtype)
        self.batch = paged_batch(shapes, self.tables, block_size)
        assert self.batch.slot_mapping.tolist() == slot_mapping  # the K/V rows written above

    def dispatch(self, causal=True, sliding_window=None) -> torch.Tensor:
        """layers.attention.paged_attention, the path the model takes."""
        return paged_attention(
            self.q, self.k_new, self.v_new, self.k_cache, self.v_cache, self.batch, SCALE, causal, sliding_window
        )

    def reference(self, causal=True, sliding_window=None) -> torch.Tensor:
        return paged_attention_ref(self.q, self.k_cache, self.v_cache, self.batch, SCALE, causal, sliding_window)

    def dense(self, causal=True, sliding_window=None) -> torch.Tensor:
        """The oracle: float64 attention per sequence over its unpaged K/V."""
        outs = []
        start = 0
        for (computed, qlen), k, v in zip(self.shapes, self.k, self.v):
            q = self.q[start : start + qlen].double()
            start += qlen
            group = H // HKV
            k = k.double().repeat_interleave(group, dim=1)  # query head h reads kv head h // group
            v = v.double().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
            q_pos = torch.arange(computed, computed + qlen)[:, None]
            k_pos = torch.arange(k.shape[0])[None, :]
            visible = torch.ones(qlen, k.shape[0], dtype=torch.bool)
            if causal:
                visible = k_pos <= q_pos
                if sliding_window is not None:
                    visible &= q_pos - k_pos < sliding_window
            scores = scores.masked_fill(~visible, float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        return torch.cat(outs)


def tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


MIXED = [(0, 9), (13, 1), (5, 6), (0, 1), (22, 1), (16, 4), (3, 1)]
DECODES = [(0, 1), (6, 1), (13, 1), (31, 1), (4, 1)]
DTYPES = [torch.float32, torch.bfloat16]


# ---- the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_dense_causal(dtype, seed):
    case = Case(MIXED, dtype=dtype, seed=seed)
    out = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.batch, SCALE, causal=True)
    torch.testing.assert_close(out.double(), case.dense(), **tol(dtype))


@pytest.mark.parametrize("window", [1, 3, 8, 100])
def test_reference_matches_dense_sliding_window(window):
    case = Case(MIXED, seed=4)
    out = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.batch, SCALE, causal=True, sliding_window=window)
    torch.testing.assert_close(out.double(), case.dense(sliding_window=window), **tol(torch.float32))


def test_sliding_window_changes_the_result():
    """Guard against a window that is silently ignored: the case is long enough for it to matter."""
    case = Case(MIXED, seed=4)
    full = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.batch, SCALE, causal=True)
    windowed = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.batch, SCALE, causal=True, sliding_window=3)
    assert not torch.allclose(full, windowed)


def test_reference_with_larger_blocks_and_single_token_sequences():
    case = Case([(0, 1), (0, 17), (40, 3)], block_size=16, seed=7)
    out = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.batch, SCALE, causal=True)
    torch.testing.assert_close(out.double(), case.dense(), **tol(torch.float32))


def test_reference_subset_of_sequences_writes_only_their_rows():
    case = Case(MIXED, seed=1)
    out = torch.full_like(case.q, 7.0)
    paged_attention_ref(case.q, case.k_cache, case.v_cache, case.batch, SCALE, causal=True, seqs=[0, 2], out=out)
    dense = case.dense()
    for i in range(len(MIXED)):
        rows = case.batch.seq_rows(i)
        if i in (0, 2):
            torch.testing.assert_close(out[rows].double(), dense[rows], **tol(torch.float32))
        else:
            assert (out[rows] == 7.0).all(), f"rows of sequence {i} were written"


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_causal_sees_the_whole_context(dtype):
    case = Case(MIXED, dtype=dtype, seed=2)
    for out in (case.dispatch(causal=False), case.reference(causal=False)):
        torch.testing.assert_close(out.double(), case.dense(causal=False), **tol(dtype))
    assert not torch.allclose(out, case.dispatch(causal=True)), "non-causal must differ from causal"


# ---- the decode fast path and the dispatch --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 1, 4, 20])
@pytest.mark.parametrize("path", ["c", "torch"])
def test_decode_attention_matches_reference(dtype, window, path, monkeypatch):
    """Both decode paths: C reading the blocks in place (CPU, 16/32-bit caches), and the batched
    torch matmuls over gathered blocks (other devices and caches; FP4SERVE_CPU_DECODE=torch)."""
    if path == "torch":
        monkeypatch.setenv("FP4SERVE_CPU_DECODE", "torch")
    elif cpu_library() is None:
        pytest.skip("no C compiler for the CPU kernels")
    case = Case(DECODES, dtype=dtype, seed=3)
    b = case.batch
    fast = decode_attention(case.q, case.k_cache, case.v_cache, b.block_tables, b.context_lens, SCALE, window)
    ref = paged_attention_ref(case.q, case.k_cache, case.v_cache, b, SCALE, causal=True, sliding_window=window)
    torch.testing.assert_close(fast, ref, **tol(dtype))
    torch.testing.assert_close(fast.double(), case.dense(sliding_window=window), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 3])
def test_dispatch_decode_only_batch(dtype, window):
    case = Case(DECODES, dtype=dtype, seed=5)
    assert case.batch.decode_only
    out = case.dispatch(sliding_window=window)
    ref = case.reference(sliding_window=window)
    torch.testing.assert_close(out, ref, **tol(dtype))
    torch.testing.assert_close(out.double(), case.dense(sliding_window=window), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("seed", range(2))
def test_dispatch_mixed_batch(dtype, window, seed):
    case = Case(MIXED, dtype=dtype, seed=10 + seed)
    assert not case.batch.decode_only
    out = case.dispatch(sliding_window=window)
    ref = case.reference(sliding_window=window)
    torch.testing.assert_close(out, ref, **tol(dtype))
    torch.testing.assert_close(out.double(), case.dense(sliding_window=window), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 3])
def test_dispatch_fresh_prompts_only(dtype, window):
    """First chunks of prompts (num_computed = 0), the shape of a plain prefill step."""
    case = Case([(0, 9), (0, 5), (0, 17), (0, 2)], dtype=dtype, seed=12)
    out = case.dispatch(sliding_window=window)
    torch.testing.assert_close(out, case.reference(sliding_window=window), **tol(dtype))
    torch.testing.assert_close(out.double(), case.dense(sliding_window=window), **tol(dtype))


def test_dispatch_single_decode_and_single_prefill():
    for shapes in ([(0, 1)], [(9, 1)], [(0, 12)], [(7, 5)]):
        case = Case(shapes, seed=6)
        out = case.dispatch()
        torch.testing.assert_close(out.double(), case.dense(), **tol(torch.float32))


# ---- the layer: write this step's K/V, then attend -------------------------------------------


def test_write_then_gather_round_trips():
    case = Case([(0, 10), (0, 3)], seed=8)
    for i in range(2):
        k = gather_kv(case.k_cache, case.batch.block_tables[i], int(case.batch.context_lens[i]))
        assert torch.equal(k, case.k[i])


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_layer_chunked_equals_one_pass(window):
    """One sequence fed in chunks of 7, 1, 5, 1, 1 tokens (prefill chunks, then decodes) through
    PagedAttention, whose cache holds only what earlier steps wrote, equals dense attention over
    the whole sequence."""
    g = torch.Generator().manual_seed(9)
    total, bs = 15, 4
    layer = PagedAttention(H, HKV, D, SCALE, causal=True, sliding_window=window)
    num_blocks = 8
    layer.bind_cache(torch.zeros(num_blocks, bs, HKV, D), torch.zeros(num_blocks, bs, HKV, D))
    blocks = [5, 2, 7, 0]  # shuffled
    q = torch.randn(total, H, D, generator=g)
    k = torch.randn(total, HKV, D, generator=g)
    v = torch.randn(total, HKV, D, generator=g)
    outs, start = [], 0
    for n in (7, 1, 5, 1, 1):
        end = start + n
        batch = build_batch([SequenceRows([0] * n, start, blocks)], bs)
        outs.append(layer(q[start:end].flatten(1), k[start:end].flatten(1), v[start:end].flatten(1), batch))
        start = end
    ours = torch.cat(outs).view(total, H, D)

    whole = Case.__new__(Case)  # the oracle over the unpaged sequence
    whole.shapes, whole.q, whole.k, whole.v = [(0, total)], q, [k], [v]
    torch.testing.assert_close(ours.double(), whole.dense(sliding_window=window), atol=1e-5, rtol=1e-5)
