"""A whole Llama-family decode step in one C call (cpu_decode.c), for CPU decode steps.

In eager torch a decode step of SmolLM2-135M is ~1,500 small ops; at one token per sequence each
costs more in dispatch than in math, so c=1 decode was bound by Python, not by reading weights.
`FusedDecoder` holds, per layer, pointers to the weights as they are stored (NVFP4 codes and
scales, bf16 or fp32 matrices), fp32 copies of the norm weights and biases, and the layer's KV
cache; one call runs every layer for M rows with the residual stream in fp32.

Which models and steps take it is decided by the model (models/llama.py `fused_decoder`), which
builds the description from its layers; this module knows tensors, not modules. Its truth is the
per-layer torch path (tests/unit/test_cpu_decode.py); FP4SERVE_CPU_DECODE=torch forces that path."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from fp4serve.formats.nvfp4 import E4M3_BYTE_VALUES
from fp4serve.kernels.cpu_build import cpu_library

ENV_VAR = "FP4SERVE_CPU_DECODE"


def c_decode_enabled() -> bool:
    """False when FP4SERVE_CPU_DECODE=torch asks for the per-layer torch path everywhere (the
    fused step, the C decode attention, and the plain weights kept for them)."""
    return os.environ.get(ENV_VAR, "fused") != "torch"


_KINDS = {torch.float32: 0, torch.bfloat16: 1}
NVFP4 = 2
# The C code keeps per-row outputs in arrays of 64.
MAX_ROWS = 64


class _Weight(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("weight", ctypes.c_void_p),
        ("block_scales", ctypes.c_void_p),
        ("global_scales", ctypes.c_void_p),
        ("global_stride", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Weight),
        ("o", _Weight),
        ("gate_up", _Weight),
        ("down", _Weight),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "num_layers",
            "hidden",
            "heads",
            "kv_heads",
            "head_dim",
            "intermediate",
            "block_size",
            "cache_bf16",
            "bf16_activations",
        )
    ]
    _fields_ += [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("e4m3_table", ctypes.c_void_p)]


@dataclass
class WeightTensors:
    """One projection as stored: dense [n, k] (fp32 or bf16), or NVFP4 (packed uint8 [n, k/2],
    e4m3 block scales [n, k/16], fp32 global scale per row [n]); bias in any float dtype."""

    dense: Tensor | None = None
    packed: Tensor | None = None
    block_scales: Tensor | None = None
    row_global: Tensor | None = None
    bias: Tensor | None = None


@dataclass
class LayerTensors:
    qkv: WeightTensors
    o: WeightTensors
    gate_up: WeightTensors  # gate rows [0, I), up rows [I, 2I)
    down: WeightTensors
    input_norm: Tensor
    post_norm: Tensor
    k_cache: Tensor  # [blocks, block_size, kv_heads, head_dim], bf16 or fp32
    v_cache: Tensor


def supported_weight(w: WeightTensors) -> bool:
    if w.dense is not None:
        return w.dense.dtype in _KINDS and w.dense.is_contiguous() and w.dense.device.type == "cpu"
    return w.packed is not None and w.packed.is_contiguous() and w.packed.device.type == "cpu"


class FusedDecoder:
    """Every layer of one decode step, in one C call. Keeps the tensors it points at alive."""

    def __init__(
        self,
        layers: list[LayerTensors],
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        block_size: int,
        eps: float,
        scale: float,
        lib: ctypes.CDLL | None = None,
    ):
        """lib: the kernel library (default: this CPU's level; tests pass the builds of others)."""
        lib = lib or cpu_library()
        if lib is None:
            raise RuntimeError("the CPU kernel library is unavailable")
        self.lib = lib
        cache_dtype = layers[0].k_cache.dtype
        bf16 = cache_dtype == torch.bfloat16  # the cache is in the model dtype
        # A bf16 model's projections take bf16 inputs, as in the per-layer path, where the CPU has
        # bf16 dot products (then 2x the products per instruction).
        self.bf16_activations = bf16 and lib.bf16_dot
        self.model = _Model(
            len(layers),
            hidden,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            block_size,
            int(bf16),
            int(self.bf16_activations),
            eps,
            scale,
            E4M3_BYTE_VALUES.data_ptr(),
        )
        self._alive: list[Tensor] = [E4M3_BYTE_VALUES]
        self.layers = (_Layer * len(layers))()
        for slot, layer in zip(self.layers, layers):
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(slot, name, self._weight(getattr(layer, name)))
            slot.input_norm = self._keep(layer.input_norm.float().contiguous())
            slot.post_norm = self._keep(layer.post_norm.float().contiguous())
            slot.k_cache, slot.v_cache = self._keep(layer.k_cache), self._keep(layer.v_cache)
        self.cache_pointers = tuple(t.data_ptr() for layer in layers for t in (layer.k_cache, layer.v_cache))
        self._scratch = torch.empty(0)

    def _keep(self, t: Tensor) -> int:
        self._alive.append(t)
        return t.data_ptr()

    def _weight(self, w: WeightTensors) -> _Weight:
        bias = self._keep(w.bias.float().contiguous()) if w.bias is not None else None
        if w.dense is not None:
            n, k = w.dense.shape
            return _Weight(_KINDS[w.dense.dtype], n, k, self._keep(w.dense), None, None, 0, bias)
        n, k = w.packed.shape[0], w.packed.shape[1] * 2
        g = w.row_global.float().reshape(-1).contiguous()
        return _Weight(
            NVFP4,
            n,
            k,
            self._keep(w.packed),
            self._keep(w.block_scales.contiguous().view(torch.uint8)),
            self._keep(g),
            int(g.numel() > 1),
            bias,
        )

    def __call__(
        self, x: Tensor, slots: Tensor, block_tables: Tensor, context_lens: Tensor, cos: Tensor, sin: Tensor
    ) -> Tensor:
        """x [M, hidden] (any float dtype) after the embedding -> fp32 [M, hidden] after the last
        layer. slots [M], block_tables [M, width], context_lens [M] int64 (context including this
        token); cos/sin [M, head_dim] fp32 at each row's position."""
        M = x.shape[0]
        if not 0 < M <= MAX_ROWS:
            raise ValueError(f"the fused decode step takes 1 to {MAX_ROWS} rows, got {M}")
        x = x.float().contiguous()
        slots, tables, lens = (t.to(torch.int64).contiguous() for t in (slots, block_tables, context_lens))
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        max_context = int(lens.max())
        threads = torch.get_num_threads()
        need = self.lib.decode_scratch_floats(ctypes.byref(self.model), M, max_context, threads)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(int(need * 1.5) + 4096, dtype=torch.float32)
        self.lib.llama_decode(
            ctypes.byref(self.model),
            self.layers,
            x.data_ptr(),
            M,
            slots.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            lens.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            self._scratch.data_ptr(),
            max_context,
            threads,
        )
        return x
