"""MTP proposer: the target checkpoint's Qwen3.5 `mtp.*` head (models/mtp.py) drafting k tokens.

After each step the head runs once over every committed row of the step (row at position t gets
token t+1 and the target's hidden state h_t), which writes its own KV for those positions, in its
own cache layer indexed by the target's block tables; each request that drafts then takes its
last committed row's prediction as draft 1 and reuses the layer on its own output for drafts
2..k (Qwen3_5MTP.propose). KV at rejected positions is never read: the next step's pass rewrites
those positions before anything attends to them."""
from __future__ import annotations

from pathlib import Path

import torch

from fp4serve.forward_batch import SequenceRows, build_batch
from fp4serve.models.mtp import Qwen3_5MTP
from fp4serve.spec_decode.proposer import CommittedStep, Proposer, Reserve


class MTPProposer(Proposer):
    cache_lookahead = 1

    def __init__(self, model_dir: Path, target, calibrate_kv_scales: bool = False):
        self.head = Qwen3_5MTP.load(target, model_dir)
        self.calibrate_kv_scales = calibrate_kv_scales  # on the head's first pass

    def cache_layers(self):
        return self.head.cache_layers()

    def weight_modules(self):
        return [self.head]

    @torch.inference_mode()
    def propose(self, requests, limits, committed: CommittedStep, reserve: Reserve) -> list[list[int]]:
        if not committed.rows:
            return [[] for _ in requests]
        # Drafts 2..k write KV at positions up to num_tokens + k - 3: make the blocks cover them now.
        wanted = {id(r): k for r, k in zip(requests, limits) if k > 0}
        for request in requests:
            k = wanted.get(id(request), 0)
            if k > 1 and not reserve(request, request.num_tokens + k - 2):
                wanted[id(request)] = 1
        target = committed.batch
        seqs, rows = [], []
        for request, i, n in committed.rows:
            start = target.num_computed[i]
            # each row gets the token after it
            blocks = request.block_ids or target.block_ids[i]  # a request finished this step released its own
            seqs.append(SequenceRows(request.token_ids_in(start + 1, start + n + 1), start, blocks))
            rows += range(target.query_start[i], target.query_start[i] + n)
        device = target.input_ids.device
        calibrate, self.calibrate_kv_scales = self.calibrate_kv_scales, False
        batch = build_batch(seqs, target.block_size, device, calibrate_kv_scales=calibrate)
        counts = [wanted.get(id(request), 0) for request, _, _ in committed.rows]
        drafts = self.head.propose(batch, committed.hidden[torch.tensor(rows, device=device)], counts)
        by_request = {id(request): d for (request, _, _), d in zip(committed.rows, drafts)}
        return [by_request.get(id(r), []) for r in requests]
