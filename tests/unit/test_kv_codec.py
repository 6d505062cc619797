"""fp8 and nvfp4 KV cache storage (formats/kv_codec.py) and attention over it.

Round trips are checked byte for byte against the NVFP4 codec (formats/nvfp4.py, itself checked
against compressed-tensors) and against torch's own float8_e4m3fn cast for fp8. Attention over a
quantized paged cache (decode kernel, fresh-prompt path, reference) is checked against a float64
oracle written here over the dequantized K/V of each sequence. Capacities are checked against the
byte counts written out by hand.
"""
from __future__ import annotations

import pytest
import torch
from conftest import paged_batch

from fp4serve.engine.cache import allocate_caches
from fp4serve.errors import ConfigError
from fp4serve.formats.kv_codec import KVCacheFormat, KVQuant, resolve_kv_cache_format
from fp4serve.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.kernels.paged_attention import decode_attention
from fp4serve.layers.attention import PagedAttention, gather_kv, paged_attention, paged_attention_ref, write_kv

H, HKV, D = 8, 2, 32
SCALE = D**-0.5
FP8, NVFP4 = KVCacheFormat("fp8_e4m3"), KVCacheFormat("nvfp4")


def fp8_expected(x: torch.Tensor, scale: float) -> torch.Tensor:
    """fp8(x / scale) saturated at +-448, then scaled back (docs/reference.md section 3), in float32
    as scales are stored."""
    s = torch.tensor(scale, dtype=torch.float32)
    return ((x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).double()


def nvfp4_expected(x: torch.Tensor, global_scale: float) -> torch.Tensor:
    """The codec's round trip with blocks of 16 along head_dim and the given global scale."""
    return dequantize_nvfp4(quantize_nvfp4(x, global_scale=global_scale)).double()


def expected(fmt: KVCacheFormat, x: torch.Tensor, scale: float) -> torch.Tensor:
    return fp8_expected(x, scale) if fmt.name == "fp8_e4m3" else nvfp4_expected(x, scale)


def scattered_slots(n: int, num_blocks: int, block_size: int, seed: int) -> torch.Tensor:
    blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    return torch.tensor([int(blocks[p // block_size]) * block_size + p % block_size for p in range(n)])


# ---- storage: write, gather, decode --------------------------------------------------------


def test_resolve_kv_cache_dtype_names():
    assert resolve_kv_cache_format("auto", torch.bfloat16).name == "bfloat16"
    assert resolve_kv_cache_format("auto", torch.float32).name == "float32"
    assert resolve_kv_cache_format("bfloat16", torch.float32).name == "bfloat16"
    assert resolve_kv_cache_format("fp8", torch.bfloat16).name == "fp8_e4m3"
    assert resolve_kv_cache_format("fp8_e4m3", torch.bfloat16).name == "fp8_e4m3"
    assert resolve_kv_cache_format("nvfp4", torch.bfloat16).name == "nvfp4"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_round_trip_matches_torch_cast_and_saturates(dtype):
    g = torch.Generator().manual_seed(0)
    k = (3 * torch.randn(40, HKV, D, generator=g)).to(dtype)
    k[0, 0, :4] = torch.tensor([100.0, -100.0, 22.4, 0.0])  # 100/0.05 = 2000: beyond fp8's 448
    v = torch.randn(40, HKV, D, generator=g).to(dtype)
    kv = KVQuant(FP8, torch.tensor(0.05), torch.tensor(0.5))
    k_cache = torch.zeros(12, 4, HKV, D, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    slots = scattered_slots(40, 12, 4, seed=1)
    write_kv(k_cache, v_cache, k, v, slots, kv)
    raw = k_cache.view(-1, HKV, D)[slots]
    assert torch.equal(raw.view(torch.uint8), (k.float() / 0.05).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    table = slots.view(-1, 4)[:, 0] // 4
    k_read = kv.decode_k(gather_kv(k_cache, table, 40), torch.float32)
    v_read = kv.decode_v(gather_kv(v_cache, table, 40), torch.float32)
    torch.testing.assert_close(k_read.double(), fp8_expected(k.float(), 0.05), rtol=0, atol=0)
    for out in (torch.bfloat16, torch.float16):  # the table decode is the float32 math, then a cast
        assert torch.equal(kv.decode_k(raw, out), (raw.float() * torch.tensor(0.05)).to(out))
    torch.testing.assert_close(v_read.double(), fp8_expected(v.float(), 0.5), rtol=0, atol=0)
    assert k_read[0, 0, :4].tolist() == pytest.approx([448 * 0.05, -448 * 0.05, 22.4, 0.0], rel=2**-4)
    # E4M3 keeps 3 mantissa bits: half an ulp is 1/16 of the value (normal range).
    inside = (k.float().abs() / 0.05 > 2**-6) & (k.float().abs() / 0.05 < 448)
    assert ((k_read - k.float()).abs() <= k.float().abs() / 16 + 1e-7)[inside].all()


@pytest.mark.parametrize("global_scale", [1.0, 0.003])
def test_nvfp4_round_trip_is_the_codec_byte_for_byte(global_scale):
    g = torch.Generator().manual_seed(2)
    k = 4 * torch.randn(37, HKV, D, generator=g)
    k[3] = 0.0  # all-zero blocks: block scale 1.0 as in the codec
    v = torch.randn(37, HKV, D, generator=g).bfloat16()
    kv = KVQuant(NVFP4, torch.tensor(global_scale), torch.tensor(global_scale))
    width = D // 2 + D // 16
    k_cache = torch.zeros(10, 4, HKV, width, dtype=torch.uint8)
    v_cache = torch.zeros_like(k_cache)
    slots = scattered_slots(37, 10, 4, seed=3)
    write_kv(k_cache, v_cache, k, v, slots, kv)
    for cache, x in ((k_cache, k), (v_cache, v)):
        codec = quantize_nvfp4(x, global_scale=global_scale)
        raw = cache.view(-1, HKV, width)[slots]
        assert torch.equal(raw[..., : D // 2], codec.packed)
        assert torch.equal(raw[..., D // 2 :], codec.block_scale.view(torch.uint8))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the table decode is the codec's math
            decoded = kv.format.decode(raw, torch.tensor(global_scale), dtype)
            assert torch.equal(decoded, dequantize_nvfp4(codec, dtype))
    # Round-trip error: half a grid step of E2M1 (at most 1/6 of the block amax, the 4 -> 6 gap)
    # plus the E4M3 rounding of the block scale (1/16), for blocks the global scale can represent
    # (amax up to 6 * 448 * global scale); beyond, values saturate at that bound.
    decoded = kv.decode_k(kv.format.encode(k, kv.k_scale), torch.float32).unflatten(-1, (-1, 16))
    blocks = k.unflatten(-1, (-1, 16))
    block_amax = blocks.abs().amax(-1, keepdim=True)
    fits = (block_amax <= 6 * 448 * global_scale).expand_as(blocks)
    assert ((decoded - blocks).abs() <= block_amax * (1 / 6 + 1 / 16) + 1e-6)[fits].all()
    assert (decoded.abs() <= 6 * 448 * global_scale * (1 + 1e-6)).all()
    assert fits.all() == (global_scale == 1.0)


def test_plain_bfloat16_cache_under_a_float32_model():
    k = torch.randn(5, HKV, D)
    cache = torch.zeros(2, 4, HKV, D, dtype=torch.bfloat16)
    write_kv(cache, cache.clone(), k, k, torch.arange(5))
    assert torch.equal(gather_kv(cache, torch.tensor([0, 1]), 5).float(), k.bfloat16().float())


def test_nvfp4_needs_head_dim_multiple_of_16():
    with pytest.raises(ConfigError, match="head_dim 24"):
        NVFP4.check_head_dim(24)
    NVFP4.check_head_dim(64)
    FP8.check_head_dim(24)


# ---- attention over quantized caches --------------------------------------------------------


class QuantizedCase:
    """Sequences (num_computed, query_len) in a paged cache of format `fmt`; the other slots hold
    large (but valid) encoded garbage, so any read outside a sequence's context shows."""

    def __init__(self, shapes, fmt, seed=0, block_size=4, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        k_scale, v_scale = (0.02, 0.01) if fmt.name == "fp8_e4m3" else (0.004, 0.002)
        self.kv = KVQuant(fmt, torch.tensor(k_scale), torch.tensor(v_scale))
        self.scales, self.shapes, self.dtype = (k_scale, v_scale), shapes, dtype
        ctx_lens = [c + q for c, q in shapes]
        blocks_per_seq = [-(-n // block_size) for n in ctx_lens]
        num_blocks = sum(blocks_per_seq) + 3
        garbage = 50 * torch.randn(num_blocks, block_size, HKV, D, generator=g)
        self.k_cache = fmt.encode(garbage, self.kv.k_scale)
        self.v_cache = fmt.encode(-garbage, self.kv.v_scale)
        perm = torch.randperm(num_blocks, generator=g).tolist()
        tables, self.k, self.v, slot_mapping, k_new, v_new = [], [], [], [], [], []
        for (computed, qlen), ctx, nb in zip(shapes, ctx_lens, blocks_per_seq):
            table, perm = perm[:nb], perm[nb:]
            k = torch.randn(ctx, HKV, D, generator=g).to(dtype)
            v = torch.randn(ctx, HKV, D, generator=g).to(dtype)
            slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
            write_kv(self.k_cache, self.v_cache, k[:computed], v[:computed], slots[:computed], self.kv)
            kn, vn = write_kv(self.k_cache, self.v_cache, k[computed:], v[computed:], slots[computed:], self.kv)
            tables.append(table)
            self.k.append(k)
            self.v.append(v)
            slot_mapping += slots[computed:].tolist()
            k_new.append(kn)
            v_new.append(vn)
        self.k_new, self.v_new = torch.cat(k_new), torch.cat(v_new)  # this step's rows as stored
        T = sum(q for _, q in shapes)
        self.q = torch.randn(T, H, D, generator=g).to(dtype)
        self.batch = paged_batch(shapes, tables, block_size)
        assert self.batch.slot_mapping.tolist() == slot_mapping  # the K/V rows written above

    def dense(self, quantized=True) -> torch.Tensor:
        """float64 causal attention per sequence over its dequantized (or original) K/V."""
        outs, start, group = [], 0, H // HKV
        for (computed, qlen), k, v in zip(self.shapes, self.k, self.v):
            if quantized:
                k, v = expected(self.kv.format, k.float(), self.scales[0]), expected(self.kv.format, v.float(), self.scales[1])
            q = self.q[start : start + qlen].double()
            start += qlen
            k = k.double().repeat_interleave(group, dim=1)
            v = v.double().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
            visible = torch.arange(k.shape[0])[None, :] <= torch.arange(computed, computed + qlen)[:, None]
            outs.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v))
        return torch.cat(outs)


FORMATS = [FP8, NVFP4]
MIXED = [(0, 9), (13, 1), (5, 6), (0, 1), (22, 1), (16, 4), (3, 1)]
SHAPES = {"mixed": MIXED, "decodes": [(0, 1), (6, 1), (13, 1), (31, 1)], "fresh": [(0, 9), (0, 5), (0, 17)]}


def tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_quantized_cache_matches_dense_over_dequantized(fmt, shapes, dtype):
    case = QuantizedCase(SHAPES[shapes], fmt, seed=len(shapes), dtype=dtype)
    dense = case.dense()
    b = case.batch
    out = paged_attention(case.q, case.k_new, case.v_new, case.k_cache, case.v_cache, b, SCALE, True, kv=case.kv)
    ref = paged_attention_ref(case.q, case.k_cache, case.v_cache, b, SCALE, True, kv=case.kv)
    torch.testing.assert_close(ref.double(), dense, **tol(dtype))
    torch.testing.assert_close(out.double(), dense, **tol(dtype))
    if b.decode_only:
        fast = decode_attention(case.q, case.k_cache, case.v_cache, b.block_tables, b.context_lens, SCALE, kv=case.kv)
        torch.testing.assert_close(fast.double(), dense, **tol(dtype))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fresh_prompts_attend_to_the_values_a_later_read_returns(fmt):
    """The fresh-prompt path must not attend to the unquantized K/V: the oracle over the
    original values is far from what the cache holds, and the dispatch must follow the cache."""
    case = QuantizedCase(SHAPES["fresh"], fmt, seed=4)
    out = paged_attention(case.q, case.k_new, case.v_new, case.k_cache, case.v_cache, case.batch, SCALE, True, kv=case.kv)
    torch.testing.assert_close(out.double(), case.dense(), **tol(torch.float32))
    assert (out.double() - case.dense(quantized=False)).abs().max() > 100 * tol(torch.float32)["atol"]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_layer_calibrates_scales_on_the_first_forward_only(fmt):
    layer = PagedAttention(H, HKV, D, SCALE)
    shape = (4, 4, HKV, fmt.row_width(D))
    layer.bind_cache(torch.zeros(shape, dtype=fmt.storage_dtype), torch.zeros(shape, dtype=fmt.storage_dtype), fmt)
    g = torch.Generator().manual_seed(5)
    top = 448.0 if fmt.name == "fp8_e4m3" else 6 * 448.0
    for step, n in enumerate((6, 1)):
        q, k, v = (torch.randn(n, heads * D, generator=g) for heads in (H, HKV, HKV))
        # the engine's runner asks for calibration on its first forward only
        batch = build_batch([SequenceRows([0] * n, 6 * step, [0, 1, 2, 3])], 4, calibrate_kv_scales=step == 0)
        layer(q, 10 * k if step else k, v, batch)
        if step == 0:
            first_k, first_v = k.abs().max() / top, v.abs().max() / top
    assert layer.k_scale.item() == pytest.approx(first_k.item(), rel=1e-6)  # the decode's 10x k changed nothing
    assert layer.v_scale.item() == pytest.approx(first_v.item(), rel=1e-6)


# ---- capacity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32])
def test_capacity_at_the_same_memory(model_dtype):
    """3 layers, 2 KV heads, head_dim 64, 1 MiB, blocks of 16. Per token K+V over all layers:
    16-bit 3*2*2*64*2 = 1536 B, fp8 768 B, nvfp4 3*2*2*(32 + 4) = 432 B (fp32: 3072 B)."""
    per_token = {"bfloat16": 1536, "float32": 3072, "fp8_e4m3": 768, "nvfp4": 432}
    baseline = KVCacheFormat.plain(model_dtype)
    tokens = {}
    for fmt in (baseline, FP8, NVFP4):
        layers = [PagedAttention(4, 2, 64, 0.125) for _ in range(3)]
        cap = allocate_caches(layers, 0, 2**20, 16, fmt, torch.device("cpu"), model_dtype)
        assert cap.kv_bytes_per_token == per_token[fmt.name]
        assert cap.num_tokens == 2**20 // (per_token[fmt.name] * 16) * 16
        assert cap.baseline_tokens == 2**20 // (per_token[baseline.name] * 16) * 16
        assert layers[0].k_cache.dtype == fmt.storage_dtype
        assert layers[0].k_cache.shape == (cap.num_blocks, 16, 2, 36 if fmt.name == "nvfp4" else 64)
        tokens[fmt.name] = cap.num_tokens
        assert cap.gain == pytest.approx(cap.num_tokens / tokens[baseline.name])
    assert tokens["fp8_e4m3"] >= 2 * tokens[baseline.name] - 16
    assert tokens["nvfp4"] > 3.5 * tokens[baseline.name]
