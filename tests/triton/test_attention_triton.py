"""The Triton paged attention against layers/attention.py's paged_attention_ref, and the layer's
Triton path (FP4SERVE_TRITON=1: the Triton KV write, then the attention for all rows at once) against
its default path.

Each case scatters its sequences over randomly chosen, non-contiguous cache blocks; every other block
holds large garbage, and block-table padding points at a garbage block: reading anything outside a
sequence's context shows. Batches are ragged and mix fresh prefills, chunks continuing a cached
prefix, decode rows and 1 + k verification rows; one chunk is long enough for several query tiles and
several key tiles (online softmax across tiles)."""

from __future__ import annotations

import pytest
import torch
from conftest import host_reads_refused

pytest.importorskip("triton")

from fp4serve.formats.kv_codec import KVCacheFormat, KVQuant
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.kernels.triton_attention import launch_config, num_splits, paged_attention_triton
from fp4serve.layers.attention import PagedAttention, paged_attention_ref, write_kv

# (cached tokens, query tokens): a fresh prefill, decodes (one fresh), a chunk over a cached prefix,
# a verification of 1 + 3 drafts, and a 70-token chunk after 40 cached tokens (110 keys: 2 key tiles)
MIXED = [(0, 9), (13, 1), (5, 6), (0, 1), (22, 4), (40, 70)]
DECODES = [(6, 1), (150, 1), (0, 1), (77, 1)]  # 151 keys: split over programs (flash-decoding)

# Tolerance in rounding steps (ulps) of the dtype at the largest |output|. fp32: the kernel differs
# from the reference only in summation order (measured <= 3 ulps; 8 allowed). 16-bit models: each
# side rounds its fp32 result once (<= 1 ulp apart), and each rounds p to the model dtype before
# p.v, as the reference's flash kernel does, but normalised by other running maxima (<= 1 ulp more).
ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}


class Case:
    def __init__(self, shapes, H, Hkv, D, kv_format, dtype, block_size=8, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.dtype, self.scale = dtype, D**-0.5
        # non-power-of-two scales: their rounding must match the reference's decode
        scales = (torch.tensor(0.02), torch.tensor(0.013)) if kv_format.name == "fp8_e4m3" else (
            torch.tensor(0.0007), torch.tensor(0.0011))  # fmt: skip
        self.kv = KVQuant(kv_format, *scales) if kv_format.quantized else KVQuant.plain(kv_format.storage_dtype)
        blocks_per_seq = [-(-(c + n) // block_size) for c, n in shapes]
        num_blocks = sum(blocks_per_seq) + 6  # holes between the sequences' blocks
        width = kv_format.row_width(D)
        shape = (2, num_blocks, block_size, Hkv, width)
        if kv_format.quantized:  # random bytes: fp8 and block-scale NaNs too, poisonous if ever read
            garbage = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(kv_format.storage_dtype)
        else:  # finite garbage, but large: a stray read would dominate
            garbage = (1e3 * torch.randn(shape, generator=gen)).to(kv_format.storage_dtype)
        self.k_cache, self.v_cache = garbage[0].clone(), garbage[1].clone()
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        seqs = []
        for (cached, n), nb in zip(shapes, blocks_per_seq):
            table, perm = perm[:nb], perm[nb:]
            ctx = cached + n
            k = torch.randn(ctx, Hkv, D, generator=gen).to(dtype)
            v = torch.randn(ctx, Hkv, D, generator=gen).to(dtype)
            slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
            # the whole context, as earlier steps and this one's KV write leave it
            write_kv(self.k_cache, self.v_cache, k, v, slots, self.kv)
            seqs.append(SequenceRows([0] * n, cached, table))
        self.batch = build_batch(seqs, block_size, pad_block=perm[0])  # padding: a garbage block
        self.q = torch.randn(self.batch.num_tokens, H, D, generator=gen).to(dtype)

    def reference(self, causal=True, window=None):
        return paged_attention_ref(
            self.q, self.k_cache, self.v_cache, self.batch, self.scale, causal, window, kv=self.kv
        )

    def triton(self, device, causal=True, window=None):
        b = self.batch
        kv = KVQuant(self.kv.format, self.kv.k_scale.to(device), self.kv.v_scale.to(device))
        out = paged_attention_triton(
            self.q.to(device), self.k_cache.to(device), self.v_cache.to(device), b.query_start_loc.to(device),
            b.context_lens.to(device), b.block_tables.to(device), max(b.query_lens), self.scale, causal, window, kv,
        )  # fmt: skip
        assert out.dtype == self.dtype
        return out.cpu()


def check(got, want):
    top = want.float().abs().max()
    ulp = torch.finfo(want.dtype).eps * 2.0 ** torch.floor(torch.log2(top))
    torch.testing.assert_close(got.float(), want.float(), atol=float(ULPS[want.dtype] * ulp), rtol=0)


FORMATS = [  # (cache format, model dtype)
    ("float32", torch.float32),
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),
    ("bfloat16", torch.float32),  # --kv-cache-dtype bfloat16 under an fp32 model
    ("fp8_e4m3", torch.float32),
    ("fp8_e4m3", torch.bfloat16),
    ("fp8_e4m3", torch.float16),
    ("nvfp4", torch.float32),
    ("nvfp4", torch.bfloat16),
    ("nvfp4", torch.float16),
]


@pytest.mark.parametrize(("name", "dtype"), FORMATS)
def test_mixed_batch_causal(device, name, dtype):
    """GQA group 4, head_dim 64."""
    case = Case(MIXED, 8, 2, 64, KVCacheFormat(name), dtype, seed=1)
    check(case.triton(device), case.reference())


@pytest.mark.parametrize(
    ("name", "dtype"), [("float32", torch.float32), ("nvfp4", torch.bfloat16), ("fp8_e4m3", torch.float16)]
)
def test_mixed_batch_without_gqa_head_dim_32(device, name, dtype):
    """Group 1 (BLOCK_Q = 64 tokens per tile), head_dim 32, cache blocks of 16."""
    case = Case(MIXED, 2, 2, 32, KVCacheFormat(name), dtype, block_size=16, seed=2)
    check(case.triton(device), case.reference())


@pytest.mark.parametrize(("name", "dtype"), [("float32", torch.float32), ("nvfp4", torch.bfloat16)])
def test_non_causal_sees_the_whole_context(device, name, dtype):
    case = Case(MIXED, 8, 2, 64, KVCacheFormat(name), dtype, seed=3)
    got = case.triton(device, causal=False)
    check(got, case.reference(causal=False))
    assert not torch.allclose(got, case.reference(causal=True)), "the case must tell causal from non-causal"


@pytest.mark.parametrize("window", [1, 5, 48])
def test_sliding_window(device, window):
    """Group 3 (not a power of two: padded rows in every tile), fp8 cache."""
    case = Case(MIXED, 6, 2, 32, KVCacheFormat("fp8_e4m3"), torch.float32, seed=4)
    got = case.triton(device, window=window)
    check(got, case.reference(window=window))
    assert not torch.allclose(got, case.reference()), "the window must change the result"


@pytest.mark.parametrize(("name", "dtype", "window"), [("bfloat16", torch.bfloat16, None), ("nvfp4", torch.float32, 4)])
def test_decode_only_step(device, name, dtype, window):
    """The captured kind of step: one token per sequence (BLOCK_M = 16 rows: the group of 4, padded),
    each row's keys split over several programs whose partial sums a second kernel combines."""
    case = Case(DECODES, 8, 2, 64, KVCacheFormat(name), dtype, block_size=4, seed=5)
    programs = (len(DECODES) // launch_config(1, 4, 64)["BLOCK_Q"] + len(DECODES)) * 2
    assert num_splits(1, programs, torch.device(device)) > 1, "the keys must be split over programs here"
    check(case.triton(device, window=window), case.reference(window=window))


@pytest.mark.parametrize("shapes", [[(40, 1)], [(0, 12)], [(9, 4)]])
def test_single_sequence(device, shapes):
    """Batch 1 (the binary search has one sequence), as a decode, a fresh prompt and a verification."""
    case = Case(shapes, 8, 2, 64, KVCacheFormat("fp8_e4m3"), torch.float16, seed=6)
    check(case.triton(device), case.reference())


# ---- the layer: FP4SERVE_TRITON=1 against the default path -------------------------------------------


def _layer_steps(monkeypatch, device, triton: bool, kv_format: KVCacheFormat, dtype):
    """Two prompts prefilled (one in two chunks), then two decode steps; returns outputs and caches."""
    monkeypatch.setenv("FP4SERVE_TRITON", "1" if triton else "0")
    H, Hkv, D, bs = 4, 2, 32, 4
    layer = PagedAttention(H, Hkv, D, D**-0.5).to(device)
    width = kv_format.row_width(D)
    caches = [torch.zeros(10, bs, Hkv, width, dtype=kv_format.storage_dtype, device=device) for _ in range(2)]
    layer.bind_cache(*caches, kv_format)
    layer.k_scale.fill_(0.05)
    layer.v_scale.fill_(0.003)
    gen = torch.Generator().manual_seed(7)
    tables = [[7, 2, 9, 4], [0, 5, 3]]
    steps = [([(0, 6), (0, 3)]), ([(6, 1), (3, 5)]), ([(7, 1), (8, 1)])]  # (start, tokens) per sequence
    outs = []
    with torch.inference_mode():
        for step in steps:
            batch = build_batch([SequenceRows([0] * n, c, t) for (c, n), t in zip(step, tables)], bs, device=device)
            T = batch.num_tokens
            q, k, v = (torch.randn(T, n * D, generator=gen).to(device, dtype) for n in (H, Hkv, Hkv))
            outs.append(layer(q, k, v, batch))
    return outs, caches


@pytest.mark.parametrize(
    ("name", "dtype"), [("float32", torch.float32), ("fp8_e4m3", torch.bfloat16), ("nvfp4", torch.float32)]
)
def test_layer_on_triton_matches_default_path(monkeypatch, device, name, dtype):
    kv_format = KVCacheFormat(name) if name != "float32" else KVCacheFormat.plain(dtype)
    ref_outs, ref_caches = _layer_steps(monkeypatch, device, False, kv_format, dtype)
    outs, caches = _layer_steps(monkeypatch, device, True, kv_format, dtype)
    for got, want in zip(caches, ref_caches):  # the KV write: bit for bit
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    for got, want in zip(outs, ref_outs):
        check(got, want)


def test_decode_step_reads_nothing_on_the_host(monkeypatch, device):
    """What a CUDA graph cannot capture (tensors made from host lists, device values read on the
    host) must not happen in the layer's Triton decode step: the KV write and the attention."""
    kv_format = KVCacheFormat("nvfp4")
    layer = PagedAttention(4, 2, 32, 32**-0.5).to(device)
    caches = [torch.zeros(6, 4, 2, kv_format.row_width(32), dtype=torch.uint8, device=device) for _ in range(2)]
    layer.bind_cache(*caches, kv_format)
    seqs = [SequenceRows([0], 5, [3, 1]), SequenceRows([0], 0, [4])]
    warm_up, batch = (build_batch(seqs, 4, device=device) for _ in range(2))
    q, k = torch.randn(2, 4 * 32, device=device), torch.randn(2, 2 * 32, device=device)
    monkeypatch.setenv("FP4SERVE_TRITON", "1")
    with torch.inference_mode():
        layer(q, k, k, warm_up)  # compiles the kernels (on a GPU) outside the checks, as graph capture warms up

    with host_reads_refused(), torch.inference_mode():
        guarded = layer(q, k, k, batch)
    with torch.inference_mode():  # the same step again (it rewrites the same K/V): the same result
        assert torch.equal(guarded, layer(q, k, k, batch))
