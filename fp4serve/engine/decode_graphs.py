"""Captured decode steps: on a GPU, one decode step of a 64-layer model is ~1,500 small kernels, and
launching them one Python call at a time costs more than running them. A CUDA graph replays the
whole forward from one host call.

A graph is captured per bucket of batch sizes (vLLM's: 1, 2, 4, then every 8), against static
input buffers; a step of B sequences runs the smallest bucket >= B, its rows past B padded with a
harmless dummy decode: KV slot -1 (the Triton KV write skips it), context length 1, and a GDN state
slot of its own that no sequence owns. Only pure decode steps are captured (one token per sequence,
no drafts, no images, no layer taps or KV calibration); every other step runs eagerly, as does a
model whose forward reads values on the host (MoE routing counts its experts' tokens there; W4A4
activation quantization checks its scales there).

The forward inside a graph must take only tensor inputs and Python values fixed by the bucket: the
Triton paths of the layers do (kernels/triton_*.py); the torch reference paths do not, so graphs
are only used where those kernels are (FP4SERVE_TRITON, kernels/triton_support.py).

On CPU there are no graphs; `FP4SERVE_CPU_GRAPH_REPLAY=1` (with FP4SERVE_TRITON=1 under the
interpreter) replays the same static-buffer protocol by re-running the forward, which is how the
padding, bucketing and buffer copies are tested without a GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from fp4serve.errors import ConfigError
from fp4serve.forward_batch import ForwardBatch
from fp4serve.layers.moe import SparseMoeBlock
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod

log = logging.getLogger(__name__)

CPU_REPLAY_ENV = "FP4SERVE_CPU_GRAPH_REPLAY"
MAX_CAPTURED_BATCH = 256


def default_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's capture sizes: 1, 2, 4, then every 8, up to max_num_seqs (rounded up to a bucket)."""
    top = min(max_num_seqs, MAX_CAPTURED_BATCH)
    candidates = [1, 2, 4, *range(8, top + 8, 8)]
    return [s for s in candidates if s < top] + [next(s for s in candidates if s >= top)]


def parse_sizes(text: str | None, max_num_seqs: int) -> list[int]:
    """--cuda-graph-sizes '1,2,4,8' -> [1, 2, 4, 8]; None -> default_sizes."""
    if text is None:
        return default_sizes(max_num_seqs)
    try:
        sizes = sorted({int(part) for part in str(text).replace(" ", "").split(",") if part})
    except ValueError:
        raise ConfigError(f"--cuda-graph-sizes {text!r}: expected batch sizes separated by commas, e.g. 1,2,4,8")
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"--cuda-graph-sizes {text!r}: batch sizes must be positive")
    return sizes


def graphs_unsupported(model, device: torch.device) -> str | None:
    """Why decode steps of this model on this device cannot be captured, or None."""
    from fp4serve.kernels.triton_support import triton_reason

    if device.type != "cuda" and os.environ.get(CPU_REPLAY_ENV) != "1":
        return f"{device.type} has no CUDA graphs"
    uses_triton, why = triton_reason(device)
    if not uses_triton:
        return f"the layers take the torch reference path ({why}), which reads values on the host"
    if any(isinstance(m, SparseMoeBlock) for m in model.modules()):
        return "MoE routing counts each expert's tokens on the host"
    if any(isinstance(getattr(m, "method", None), NVFP4LinearMethod) and m.method.compute == "w4a4"
           for m in model.modules()):  # fmt: skip
        return "--nvfp4-compute w4a4 checks the activations' scales on the host"
    return None


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph, or _Rerun on CPU
    hidden: torch.Tensor  # [size, H]: the graph's output buffer


class _Rerun:
    """CPU stand-in for a CUDA graph: replay re-runs the captured forward on the same buffers."""

    def __init__(self, forward):
        self.forward = forward
        self.hidden = forward()

    def replay(self):
        self.hidden.copy_(self.forward())


class DecodeGraphs:
    """The captured decode steps of one model. `run(batch)` returns the hidden states of a decode
    step from its graph, or None when the step is not one the graphs cover."""

    def __init__(self, model, device: torch.device, sizes: list[int], max_blocks: int, block_size: int, pad_slot: int):
        self.model = model
        self.device = device
        self.sizes = sizes
        self.block_size = block_size
        self.pad_slot = pad_slot
        top = sizes[-1]

        def buffer(fill, *shape):
            return torch.full(shape or (top,), fill, dtype=torch.long, device=device)

        self.input_ids, self.positions, self.slot_mapping = buffer(0), buffer(0), buffer(-1)
        self.context_lens, self.state_slots = buffer(1), buffer(pad_slot)
        self.block_tables = buffer(0, top, max_blocks)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.long, device=device)
        self.captured: dict[int, _Captured] = {}

    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs then fit in its memory pool)."""
        pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        for size in reversed(self.sizes):
            batch = self._static_batch(size)
            if self.device.type == "cuda":
                # warm up outside the graph: Triton compiles, the caching allocator settles
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream), torch.inference_mode():
                    self.model(self._static_batch(size))
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                    hidden = self.model(batch)
                self.captured[size] = _Captured(graph, hidden)
            else:
                with torch.inference_mode():
                    # a new batch per run: its memo (rotary tables) must be recomputed from the buffers,
                    # as a graph recomputes everything it captured
                    rerun = _Rerun(lambda size=size: self.model(self._static_batch(size)))
                self.captured[size] = _Captured(rerun, rerun.hidden)
        log.info("decode graphs: captured batch sizes %s", ",".join(map(str, self.sizes)))

    def _static_batch(self, size: int) -> ForwardBatch:
        """A decode batch over the first `size` rows of the buffers. The Python lists say one
        cached token per row: the Triton paths read the real lengths from context_lens."""
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            query_lens=[1] * size,
            num_computed=[1] * size,
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            state_slots=self.state_slots[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            block_size=self.block_size,
            num_drafts=[0] * size,
        )

    def covers(self, batch: ForwardBatch) -> bool:
        return (
            batch.decode_only
            and batch.num_seqs <= self.sizes[-1]
            and not any(batch.num_drafts or ())
            and all(batch.num_computed)  # a fresh sequence's GDN state starts from zeros: eager
            and batch.block_tables.shape[1] <= self.block_tables.shape[1]
            and batch.mrope_positions is None
            and batch.embed_rows is None
            and not batch.capture_layers
            and not batch.calibrate_kv_scales
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor | None:
        if not self.captured or not self.covers(batch):
            return None
        n = batch.num_seqs
        size = next(s for s in self.sizes if s >= n)
        width = batch.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.context_lens[:n].copy_(batch.context_lens)
        self.state_slots[:n].copy_(batch.state_slots)
        self.block_tables[:n, :width].copy_(batch.block_tables)
        # rows n..size: the dummy decode (positions 0, slot -1, one context token, the padding state slot)
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(-1)
        self.context_lens[n:size].fill_(1)
        self.state_slots[n:size].fill_(self.pad_slot)
        captured = self.captured[size]
        captured.graph.replay()
        return captured.hidden[:n]
