"""DFlash proposer: a z-lab block drafter (models/dflash.py) proposing up to block_size - 1 tokens
in one forward.

While the target runs, forward hooks keep its hidden states after `target_layer_ids`. After the
commit the drafter turns the step's committed rows into context K/V in its own cache (indexed by
the target's block tables; rejected drafts' rows are never written), then each drafting request
runs one block [last token, MASK x (B-1)] over its context and takes the argmax of every mask slot."""
from __future__ import annotations

import torch

from fp4serve.engine.runner import token_slice
from fp4serve.models.dflash import DFlashDraftModel, TargetFeatureCapture
from fp4serve.spec_decode.proposer import committed_rows


class DFlashProposer:
    def __init__(self, config, engine):
        self.drafter = DFlashDraftModel.load(config.model, engine.model, engine.dtype)
        self.capture = TargetFeatureCapture(engine.model, self.drafter.target_layer_ids)

    def cache_layers(self):
        return self.drafter.cache_layers()

    @torch.inference_mode()
    def propose(self, requests, limits, plan, step, num_accepted) -> list[list[int]]:
        live = committed_rows(plan, step, num_accepted)
        if live:
            batch = step.batch
            rows = torch.tensor(
                [r for i, n in live for r in range(batch.query_start[i], batch.query_start[i] + n)],
                device=batch.input_ids.device,
            )
            self.drafter.write_context(self.capture.features()[rows], batch.positions[rows], batch.slot_mapping[rows])
        drafting = [(j, r) for j, r in enumerate(requests) if limits[j] > 0]
        out: list[list[int]] = [[] for _ in requests]
        if not drafting:
            return out
        device = step.batch.input_ids.device
        tables = [r.block_ids for _, r in drafting]
        width = max(len(t) for t in tables)
        drafts = self.drafter.propose(
            torch.tensor([token_slice(r, r.num_tokens - 1, r.num_tokens)[0] for _, r in drafting], device=device),
            # context: every computed (committed) position; the block starts at the last token's
            torch.tensor([r.num_computed_tokens for _, r in drafting], device=device),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device),
        ).tolist()
        for (j, _), draft in zip(drafting, drafts):
            out[j] = draft[: limits[j]]
        return out
