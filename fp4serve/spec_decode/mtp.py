"""MTP proposer: the target checkpoint's Qwen3.5 `mtp.*` head (models/mtp.py) drafting k tokens.

After each step the head runs once over every committed row of the step (row at position t gets
token t+1 and the target's hidden state h_t), which writes its own KV for those positions, in its
own cache layer indexed by the target's block tables; each request that drafts then takes its
last committed row's prediction as draft 1 and reuses the layer on its own output for drafts
2..k (one row per request at the following positions). KV at rejected positions is never read:
the next step's pass rewrites those positions before anything attends to them."""
from __future__ import annotations

import torch

from fp4serve.engine.runner import token_slice
from fp4serve.forward_batch import ForwardBatch
from fp4serve.models.mtp import Qwen3_5MTP, iter_mtp_tensors
from fp4serve.spec_decode.proposer import committed_rows


class MTPProposer:
    def __init__(self, config, engine):
        self.engine = engine
        self.head = Qwen3_5MTP(engine.model)
        self.head.load_weights(iter_mtp_tensors(config.model))
        self.head.eval()

    def cache_layers(self):
        return self.head.cache_layers()

    @torch.inference_mode()
    def propose(self, requests, limits, plan, step, num_accepted) -> list[list[int]]:
        live = committed_rows(plan, step, num_accepted)
        if not live:
            return [[] for _ in requests]
        batch = step.batch
        # Drafts 2..k write KV at positions up to num_tokens + k - 3: make the blocks cover them now.
        wanted = {id(r): k for r, k in zip(requests, limits) if k > 0}
        for request in requests:
            k = wanted.get(id(request), 0)
            if k > 1 and not self.engine.scheduler.reserve(request, request.num_tokens + k - 2):
                wanted[id(request)] = 1
        rows, ids, seq_tables = [], [], []
        for i, n in live:
            request, start = plan.scheduled[i].request, batch.num_computed[i]
            rows += range(batch.query_start[i], batch.query_start[i] + n)
            ids += token_slice(request, start + 1, start + n + 1)  # each row gets the token after it
            seq_tables.append(request.block_ids)
        rows_t = torch.tensor(rows, device=batch.input_ids.device)
        first = ForwardBatch(
            input_ids=torch.tensor(ids, device=rows_t.device),
            positions=batch.positions[rows_t],
            query_lens=[n for _, n in live],
            num_computed=[batch.num_computed[i] for i, _ in live],
            slot_mapping=batch.slot_mapping[rows_t],
            block_tables=_table(seq_tables, rows_t.device),
            context_lens=torch.tensor([batch.num_computed[i] + n for i, n in live], device=rows_t.device),
            state_slots=torch.zeros(len(live), dtype=torch.long, device=rows_t.device),
            block_size=batch.block_size,
        )
        hidden = self.head(first, first.input_ids, step.hidden[rows_t])
        # Each drafting request continues from its last committed row.
        where = {id(plan.scheduled[i].request): first.query_start[j + 1] - 1 for j, (i, _) in enumerate(live)}
        drafting = [r for r in requests if wanted.get(id(r), 0) > 0]
        drafts: dict[int, list[int]] = {id(r): [] for r in drafting}
        if drafting:
            last = torch.tensor([where[id(r)] for r in drafting], device=rows_t.device)
            hidden, positions = hidden[last], first.positions[last]
            tokens = self.head.compute_logits(hidden).argmax(dim=-1)
            for step_index in range(1, max(wanted[id(r)] for r in drafting) + 1):
                for r, t in zip(drafting, tokens.tolist()):
                    drafts[id(r)].append(t)
                keep = [j for j, r in enumerate(drafting) if wanted[id(r)] > step_index]
                if not keep:
                    break
                drafting = [drafting[j] for j in keep]
                positions = positions[keep] + 1
                one = _one_row_batch([r.block_ids for r in drafting], positions, batch.block_size)
                hidden = self.head(one, tokens[keep], hidden[keep], step_index)
                tokens = self.head.compute_logits(hidden).argmax(dim=-1)
        return [drafts.get(id(r), []) for r in requests]


def _table(tables: list[list[int]], device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)


def _one_row_batch(tables: list[list[int]], positions: torch.Tensor, block_size: int) -> ForwardBatch:
    """One row per sequence at `positions`, writing KV into the sequence's own blocks."""
    table = _table(tables, positions.device)
    seqs = torch.arange(len(tables), device=positions.device)
    return ForwardBatch(
        input_ids=positions.new_zeros(len(tables)),  # the head reads its ids from the caller
        positions=positions,
        query_lens=[1] * len(tables),
        num_computed=positions.tolist(),
        slot_mapping=table[seqs, positions // block_size] * block_size + positions % block_size,
        block_tables=table,
        context_lens=positions + 1,
        state_slots=torch.zeros(len(tables), dtype=torch.long, device=positions.device),
        block_size=block_size,
    )
