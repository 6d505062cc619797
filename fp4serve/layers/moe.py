"""SwiGLU MLPs and the Qwen3.5-MoE sparse block (softmax router, top-k, shared expert with a sigmoid gate).

Experts are one `GatedMLP` each, i.e. ordinary `Linear`s, so every weight format (plain, NVFP4)
applies per expert and the hub's per-expert checkpoint names (`mlp.experts.{e}.gate_proj.weight`,
what real NVFP4 checkpoints and vLLM use) load through the normal LoadPlan. transformers 5 keeps
experts as fused 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I]); `split_fused_experts` rewrites those into per-expert tensors before loading.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.errors import CheckpointError
from fp4serve.layers.activation import silu_and_mul
from fp4serve.layers.linear import Linear


class GatedMLP(nn.Module):
    """down(SiLU(gate(x)) * up(x)) with gate/up fused into one Linear (checkpoint: gate_proj, up_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype, prefix: str = ""):
        super().__init__()
        gate_up = [intermediate_size, intermediate_size]
        self.gate_up_proj = Linear(hidden_size, gate_up, dtype=dtype, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = Linear(intermediate_size, hidden_size, dtype=dtype, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32 over all experts, keep the top k, optionally rescale them to sum to 1.
    Returns (weights [T, k] in the logits' dtype, expert ids [T, k])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


class SparseMoeBlock(nn.Module):
    """Routed experts plus an always-on shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        shared_intermediate_size: int,
        renormalize: bool,
        dtype: torch.dtype,
        prefix: str = "",
    ):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Linear(hidden_size, num_experts, dtype=dtype, prefix=f"{prefix}.gate")
        self.experts = nn.ModuleList(
            GatedMLP(hidden_size, intermediate_size, dtype, f"{prefix}.experts.{e}") for e in range(num_experts)
        )
        self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, dtype, f"{prefix}.shared_expert")
        self.shared_expert_gate = Linear(hidden_size, 1, dtype=dtype, prefix=f"{prefix}.shared_expert_gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)
        out = self.routed(x, weights, experts)
        return out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sum over each token's k experts of weight * expert(x). (token, choice) pairs are sorted by
        expert so each expert with work runs once, on all its tokens together."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        flat_weights = weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start : start + n]
            start += n
            tokens = pairs // self.top_k
            y = self.experts[e](x[tokens]) * flat_weights[pairs, None]
            out.index_add_(0, tokens, y)
        return out


_FUSED_EXPERTS = re.compile(r"((?:.+\.)?experts)\.(gate_up_proj|down_proj)")


def split_fused_experts(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rewrite transformers' fused expert tensors into the hub's per-expert names; pass others through.
    `experts.gate_up_proj` [E, 2I, H] holds gate rows then up rows per expert; `experts.down_proj` [E, H, I]."""
    for name, tensor in weights:
        match = _FUSED_EXPERTS.fullmatch(name)
        if match is None:
            yield name, tensor
            continue
        prefix, kind = match.groups()
        if tensor.dim() != 3:
            raise CheckpointError(f"{name}: fused experts must be 3-D [experts, out, in], not {tuple(tensor.shape)}")
        for e in range(tensor.shape[0]):
            if kind == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate
                yield f"{prefix}.{e}.up_proj.weight", up
