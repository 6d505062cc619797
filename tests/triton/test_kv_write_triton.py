"""The Triton KV write against layers/attention.py's write_kv (KVCacheFormat.encode), bit for bit, for
every KV format: the whole cache is compared byte for byte, so a row written to the wrong slot, a
padding row (slot < 0) written anywhere, or one rounding step off in any code or scale fails."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fp4serve.formats.kv_codec import KVCacheFormat, KVQuant
from fp4serve.kernels.triton_kv_write import write_kv_triton
from fp4serve.layers.attention import write_kv

NUM_BLOCKS, BLOCK_SIZE = 6, 4


def _inputs(T, Hkv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(T, Hkv, D, generator=gen) * 3
    v = torch.randn(T, Hkv, D, generator=gen)
    k[0] *= 400  # beyond fp8's 448 once divided by the scale; nvfp4 blocks whose scale saturates
    v[1, :, :16] = 0  # an all-zero nvfp4 block (stored scale 1.0)
    v[2, :, 16:32] = 1e-30  # a block whose scale underflows E4M3 (also stored as 1.0)
    k[3, 0] = torch.tensor([0.5, 1.25, -2.5, 0.75, 3.5, -5.0, 1.75, -0.25]).repeat(D // 8)  # E2M1 ties
    return k.to(dtype), v.to(dtype)


def _garbage_caches(kv_format: KVCacheFormat, Hkv, D, seed):
    """Random bytes everywhere: whatever the kernel does not write must stay exactly as it was."""
    gen = torch.Generator().manual_seed(seed)
    width = kv_format.row_width(D)
    dtype = kv_format.storage_dtype
    nbytes = NUM_BLOCKS * BLOCK_SIZE * Hkv * width * dtype.itemsize
    caches = []
    for _ in range(2):
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
        if dtype.is_floating_point and dtype.itemsize > 1:  # keep plain garbage finite: NaN != NaN
            raw = torch.randn(nbytes // dtype.itemsize, generator=gen).to(dtype).view(torch.uint8)
        caches.append(raw.view(dtype).view(NUM_BLOCKS, BLOCK_SIZE, Hkv, width))
    return caches


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


CASES = [  # (format, k/v dtype)
    ("float32", torch.float32),
    ("bfloat16", torch.float32),  # --kv-cache-dtype bfloat16 under an fp32 model: a rounding cast
    ("bfloat16", torch.bfloat16),
    ("float16", torch.float16),
    ("fp8_e4m3", torch.float32),
    ("fp8_e4m3", torch.bfloat16),
    ("nvfp4", torch.float32),
    ("nvfp4", torch.float16),
]


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize(("Hkv", "D"), [(2, 64), (3, 32)])
def test_kv_write_is_bit_exact(device, name, dtype, Hkv, D):
    kv_format = KVCacheFormat(name)
    # non-power-of-two scales: x / scale and amax / 6 / g round, and must round as torch does
    kv = KVQuant(kv_format, torch.tensor(0.37), torch.tensor(1.9))
    k, v = _inputs(7, Hkv, D, dtype, seed=Hkv)
    slots = torch.tensor([5, 22, -1, 0, 13, -1, 9])  # scattered, not in order, two padding rows
    k_cache, v_cache = _garbage_caches(kv_format, Hkv, D, seed=D)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    real = slots >= 0
    write_kv(want_k, want_v, k[real], v[real], slots[real], kv)

    kv_dev = KVQuant(kv_format, kv.k_scale.to(device), kv.v_scale.to(device))
    got_k, got_v = k_cache.to(device), v_cache.to(device)
    write_kv_triton(got_k, got_v, k.to(device), v.to(device), slots.to(device), kv_dev)
    for got, want in ((got_k, want_k), (got_v, want_v)):
        differ = (_as_bytes(got.cpu()) != _as_bytes(want)).view(*want.shape[:3], -1).any(-1)
        assert not differ.any(), f"rows differ at (block, offset, head) {differ.nonzero()[:4].tolist()}"


def test_kv_write_fp8_saturates_instead_of_nan(device):
    """Values far beyond 448 * scale store +-448 (torch's plain cast would give NaN)."""
    kv = KVQuant(KVCacheFormat("fp8_e4m3"), torch.tensor(1.0, device=device), torch.tensor(1.0, device=device))
    k = torch.tensor([1e6, -1e6, 448.0, 500.0] * 4, device=device).view(1, 1, 16)
    k_cache = torch.zeros(1, 4, 1, 16, dtype=torch.float8_e4m3fn, device=device)
    v_cache = torch.zeros_like(k_cache)
    write_kv_triton(k_cache, v_cache, k, k.clone(), torch.tensor([2], device=device), kv)
    assert k_cache[0, 2, 0].float().tolist() == [448.0, -448.0, 448.0, 448.0] * 4
    assert not k_cache[0, [0, 1, 3]].float().any()


def test_kv_write_skips_every_padding_row(device):
    """A captured step's padding: every slot < 0, nothing written at all."""
    k_cache, v_cache = _garbage_caches(KVCacheFormat("nvfp4"), 2, 32, seed=3)
    before = k_cache.clone(), v_cache.clone()
    k = torch.randn(3, 2, 32, device=device)
    kv = KVQuant(KVCacheFormat("nvfp4"), torch.tensor(1.0, device=device), torch.tensor(1.0, device=device))
    caches = k_cache.to(device), v_cache.to(device)
    write_kv_triton(*caches, k, k, torch.full((3,), -1, device=device), kv)
    assert all(torch.equal(c.cpu(), b) for c, b in zip(caches, before))
