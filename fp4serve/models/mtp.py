"""Qwen3.5 / 3.6 multi-token-prediction head (`mtp.*` tensors of the target checkpoint).

One step, per row (docs/reference.md s.5; vLLM's Qwen3_5MultiTokenPredictor):
    x = fc(cat[pre_fc_norm_embedding(embed(token_{t+1})), pre_fc_norm_hidden(h_t)])
    h' = norm(layers[step % n](x));  logits = lm_head(h')    -> the token at position t + 2
`h_t` is the target's hidden state at position t AFTER its final norm (what the target model's
forward returns, as in vLLM). Embedding and lm_head are the target's own modules, shared, not copied.

Positions convention (vLLM's): the row that combines h_t with token_{t+1} is at position t: its
rotary position is t and its K/V go to the KV slot of position t, through the same block table as
the target. So the first MTP pass has the rows, positions and KV slots of the target's committed
rows, with the ids shifted by one (row t gets token_{t+1}; a sequence's last row gets the token
just sampled).
Draft step j >= 2 is one row per sequence at position (last row's position) + j - 1, fed the previous
step's output h' and draft token. Rows written at positions past the committed length are harmless:
attention reads only positions < context_lens, and the next step's first MTP pass rewrites them.

Use (the engine allocates the KV of `cache_layers()` from the same pool and block tables as the
target's attention layers; block tables must already cover (last row's position) + k - 1):
    mtp = Qwen3_5MTP.load(target, target_path)     # target: a loaded Qwen3_5*ForCausalLM (drop_mtp=True)
    batch = build_batch([SequenceRows(ids[start + 1 : end + 1], start, block_ids), ...], block_size)
    drafts = mtp.propose(batch, target_hidden, k)   # a list of drafts per sequence
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from fp4serve.errors import CheckpointError
from fp4serve.formats.safetensors_io import weight_files
from fp4serve.forward_batch import ForwardBatch, SequenceRows, build_batch
from fp4serve.layers.linear import Linear
from fp4serve.layers.moe import split_fused_experts
from fp4serve.layers.norm import RMSNorm
from fp4serve.layers.packed_linear import pack_model_linears, packing_available
from fp4serve.models.qwen3_5 import STACKED, Qwen3_5DecoderLayer
from fp4serve.models.weights import LoadPlan, load_weights


@dataclass(frozen=True)
class TargetModules:
    """The target's embedding and lm_head. A plain holder, not an nn.Module: the target owns
    (and loads) these parameters; registering them here would make the MTP loader expect them."""

    embed_tokens: nn.Embedding
    lm_head: Linear


@contextmanager
def built_like(target) -> Iterator[None]:
    """Parameters created without an explicit dtype or device (norm weights) take the target's, as
    models/loader.py builds the target; fp32 buffers (rotary inv_freq) stay fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(target.dtype)
    try:
        with torch.device(target.model.embed_tokens.weight.device):
            yield
    finally:
        torch.set_default_dtype(previous)


class MultiTokenPredictor(nn.Module):
    """Parameters named as the checkpoint's `mtp.*` tensors (under the `mtp` attribute of Qwen3_5MTP)."""

    def __init__(self, config, dtype: torch.dtype, moe: bool):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.num_layers = getattr(config, "mtp_num_hidden_layers", 1) or 1
        self.fc = Linear(2 * hidden, hidden, dtype=dtype, prefix="mtp.fc")
        self.pre_fc_norm_embedding = RMSNorm(hidden, eps, zero_centered=True)
        self.pre_fc_norm_hidden = RMSNorm(hidden, eps, zero_centered=True)
        # MTP layers are full-attention decoder layers whatever the target's layer pattern:
        # build them with the index of one of the target's full-attention layers.
        if "full_attention" not in config.layer_types:
            raise CheckpointError("an MTP head needs a full-attention layer type in the target config")
        full = config.layer_types.index("full_attention")
        self.layers = nn.ModuleList(
            Qwen3_5DecoderLayer(config, full, dtype, moe, f"mtp.layers.{i}") for i in range(self.num_layers)
        )
        self.norm = RMSNorm(hidden, eps, zero_centered=True)


class Qwen3_5MTP(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.config = target.config
        self.dtype = target.dtype
        self.target = TargetModules(target.model.embed_tokens, target.lm_head)
        with built_like(target):
            self.mtp = MultiTokenPredictor(target.config, target.dtype, target.moe)

    @classmethod
    def load(cls, target, model_dir: str | Path) -> Qwen3_5MTP:
        """Build for `target`, load the `mtp.*` tensors of its checkpoint strictly, pack for oneDNN
        where the target's linears are packed."""
        head = cls(target)
        head.load_weights(iter_mtp_tensors(model_dir))
        if packing_available(target.dtype, target.model.embed_tokens.weight.device):
            pack_model_linears(head)
        return head.eval()

    def forward(self, batch: ForwardBatch, target_hidden: torch.Tensor, step: int = 0) -> torch.Tensor:
        """One MTP pass over the rows of `batch`: batch.input_ids [T] holds the token after each
        row's position, target_hidden [T, H] the target's hidden state at it -> h' [T, H]."""
        m = self.mtp
        embeds = m.pre_fc_norm_embedding(self.target.embed_tokens(batch.input_ids))
        x = m.fc(torch.cat([embeds, m.pre_fc_norm_hidden(target_hidden)], dim=-1))
        return m.norm(m.layers[step % m.num_layers](x, batch))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.lm_head(hidden)

    @torch.inference_mode()
    def propose(
        self,
        batch: ForwardBatch,
        target_hidden: torch.Tensor,
        num_tokens: int | list[int],
        last_rows: list[int] | None = None,
    ) -> list[list[int]]:
        """Greedy drafts per sequence of `batch` (built by build_batch, ids shifted by one):
        num_tokens[i] of them (an int: the same for all; 0: none). The first pass covers every row
        of `batch` (writing the MTP's K/V for all of them); sequence i drafts from its row
        last_rows[i] (default: its last row; after a partial acceptance, the last accepted one).
        Later passes reuse the layer on its own output, one row per sequence still drafting, at
        the next positions, in the sequence's own blocks (which must already cover them)."""
        n = batch.num_seqs
        counts = [num_tokens] * n if isinstance(num_tokens, int) else list(num_tokens)
        if last_rows is None:
            last_rows = [batch.query_start[i + 1] - 1 for i in range(n)]
        hidden = self(batch, target_hidden)
        drafts: list[list[int]] = [[] for _ in range(n)]
        seqs = [i for i in range(n) if counts[i] > 0]
        if not seqs:
            return drafts
        device = batch.input_ids.device
        rows = torch.tensor([last_rows[i] for i in seqs], device=device)
        hidden, positions = hidden[rows], batch.positions[rows].tolist()
        tokens = self.compute_logits(hidden).argmax(dim=-1).tolist()
        step = 1
        while True:
            for i, token in zip(seqs, tokens):
                drafts[i].append(token)
            keep = [j for j, i in enumerate(seqs) if counts[i] > step]
            if not keep:
                return drafts
            seqs, positions = [seqs[j] for j in keep], [positions[j] + 1 for j in keep]
            rows = [SequenceRows([tokens[j]], p, batch.block_ids[i]) for j, i, p in zip(keep, seqs, positions)]
            hidden = self(build_batch(rows, batch.block_size, device), hidden[torch.tensor(keep, device=device)], step)
            tokens = self.compute_logits(hidden).argmax(dim=-1).tolist()
            step += 1

    def cache_layers(self) -> list[nn.Module]:
        """Attention layers whose KV the engine allocates (same spec type as the target's)."""
        return [m for m in self.modules() if hasattr(m, "cache_spec")]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Strict over `mtp.*`: every MTP parameter filled, every `mtp.*` tensor used. Other tensors
        of the checkpoint belong to the target and are skipped here. Both expert layouts load."""
        mtp_weights = [(name, t) for name, t in split_fused_experts(weights) if name.startswith("mtp.")]
        if not mtp_weights:
            raise CheckpointError(
                "the checkpoint has no mtp.* tensors: it has no MTP head (use another speculative method)"
            )
        load_weights(self, mtp_weights, LoadPlan(stacked=STACKED))
        finish_linears(self)


def finish_linears(model: nn.Module) -> None:
    """What CausalLM.load_weights does after loading: let each weight format check and lay out its tensors."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.process_weights_after_loading(module)


def iter_mtp_tensors(model_dir: str | Path) -> Iterable[tuple[str, torch.Tensor]]:
    """The checkpoint's `mtp.*` tensors, without reading the target's weights (a 27B model's
    files are read once, by the target's own load)."""
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                # safe_open objects are not iterable
                names = [name for name in f.keys() if name.startswith("mtp.")]  # noqa: SIM118
                for name in names:
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types; name the file
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
