"""ForwardBatch: the flat tensors one model forward needs. Built by engine/runner.py, read by layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Tokens of several sequences laid end to end ("varlen"), sequence i owning rows
    query_start[i]:query_start[i+1]. Per-sequence lists stay Python lists: CPU code loops over
    them, and turning them into tensors on every access would cost more than it saves."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long, absolute position of each token in its sequence
    query_lens: list[int]  # tokens scheduled this step, per sequence
    num_computed: list[int]  # tokens already in the caches before this step, per sequence
    slot_mapping: torch.Tensor  # [T] long, KV slot (block * block_size + offset) of each token
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with 0
    context_lens: torch.Tensor  # [B] long, num_computed + query_len
    state_slots: torch.Tensor  # [B] long, GDN state slot of each sequence
    block_size: int
    # Draft tokens at the end of each sequence's rows (speculative verification): layers with
    # recurrent state keep the state after each of them, so a partial acceptance can be restored.
    num_drafts: list[int] | None = None

    def __post_init__(self):
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        self.query_start = starts
        self.decode_only = all(n == 1 for n in self.query_lens)
        self._memo: dict = {}

    def memo(self, key, compute):
        """Per-step values every layer would otherwise recompute (rotary cos/sin, gather indices)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    def seq_rows(self, i: int) -> slice:
        return slice(self.query_start[i], self.query_start[i + 1])
