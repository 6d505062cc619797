"""DFlash proposer: a z-lab block drafter (models/dflash.py) proposing up to block_size - 1 tokens
in one forward.

The runner keeps the target's hidden states after `target_layer_ids` (Proposer.capture_layers).
After the commit the drafter turns the step's committed rows into context K/V in its own cache
(indexed by the target's block tables; rejected drafts' rows are never written), then each
drafting request runs one block [last token, MASK x (B-1)] over its context and takes the argmax
of every mask slot."""
from __future__ import annotations

from pathlib import Path

import torch

from fp4serve.models.dflash import DFlashDraftModel, target_features
from fp4serve.spec_decode.proposer import CommittedStep, Proposer, Reserve


class DFlashProposer(Proposer):
    def __init__(self, drafter_dir: Path, target):
        self.drafter = DFlashDraftModel.load(drafter_dir, target, target.dtype)
        self.capture_layers = tuple(self.drafter.target_layer_ids)

    def cache_layers(self):
        return self.drafter.cache_layers()

    def weight_modules(self):
        return [self.drafter]

    @torch.inference_mode()
    def propose(self, requests, limits, committed: CommittedStep, reserve: Reserve) -> list[list[int]]:
        batch = committed.batch
        device = batch.input_ids.device
        if committed.rows:
            rows = torch.tensor(
                [r for _, i, n in committed.rows for r in range(batch.query_start[i], batch.query_start[i] + n)],
                device=device,
            )
            features = target_features(committed.captures, self.drafter.target_layer_ids)
            self.drafter.write_context(features[rows], batch.positions[rows], batch.slot_mapping[rows])
        drafting = [(j, r) for j, r in enumerate(requests) if limits[j] > 0]
        out: list[list[int]] = [[] for _ in requests]
        if not drafting:
            return out
        tables = [r.block_ids for _, r in drafting]
        width = max(len(t) for t in tables)
        drafts = self.drafter.propose(
            torch.tensor([r.token_ids_in(r.num_tokens - 1, r.num_tokens)[0] for _, r in drafting], device=device),
            # context: every computed (committed) position; the block starts at the last token's
            torch.tensor([r.num_computed_tokens for _, r in drafting], device=device),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device),
        ).tolist()
        for (j, _), draft in zip(drafting, drafts):
            out[j] = draft[: limits[j]]
        return out
