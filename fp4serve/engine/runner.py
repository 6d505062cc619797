"""ModelRunner: plan -> flat tensors -> model -> logits of the rows that sample. Owns no policy."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4serve.engine.request import Request
from fp4serve.engine.scheduler import SchedulerPlan
from fp4serve.forward_batch import ForwardBatch


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without concatenating the whole history."""
    prompt = request.prompt_token_ids
    if end <= len(prompt):
        return prompt[start:end]
    out = request.output_token_ids
    if start >= len(prompt):
        return out[start - len(prompt) : end - len(prompt)]
    return prompt[start:] + out[: end - len(prompt)]


@dataclass
class StepOutput:
    hidden: torch.Tensor  # [T, H] every scheduled token
    logits: torch.Tensor  # [sum(1 + k_i), V] in the model dtype: for each of sample_rows, 1 + its drafts rows
    sample_rows: list[int]  # index into plan.scheduled of each request that samples
    batch: ForwardBatch  # what the model ran (model drafters reuse its positions and KV slots)


class ModelRunner:
    def __init__(self, model, block_size: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.state_layers = [m for m in model.cache_layers() if hasattr(m, "restore_verified")]

    def prepare(self, plan: SchedulerPlan) -> ForwardBatch:
        bs = self.block_size
        ids, positions, slots, query_lens, num_computed, tables, state_slots = [], [], [], [], [], [], []
        for item in plan.scheduled:
            request, start = item.request, item.request.num_computed_tokens
            end = start + item.num_tokens
            ids += token_slice(request, start, end - item.num_drafts) + item.draft_token_ids
            positions += range(start, end)
            blocks = request.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(item.num_tokens)
            num_computed.append(start)
            tables.append(blocks)
            state_slots.append(request.state_slot if request.state_slot is not None else 0)
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        dev = self.device
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            query_lens=query_lens,
            num_computed=num_computed,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=table.to(dev),
            context_lens=torch.tensor([c + q for c, q in zip(num_computed, query_lens)], dtype=torch.long, device=dev),
            state_slots=torch.tensor(state_slots, dtype=torch.long, device=dev),
            block_size=bs,
            num_drafts=[item.num_drafts for item in plan.scheduled],
        )

    @torch.inference_mode()
    def execute(self, plan: SchedulerPlan) -> StepOutput:
        batch = self.prepare(plan)
        hidden = self.model(batch)
        sample_rows = [i for i, item in enumerate(plan.scheduled) if item.samples]
        # A verified request needs logits at its last token and at each draft (1 + k rows).
        ends = [batch.query_start[i + 1] for i in sample_rows]
        rows = [r for i, end in zip(sample_rows, ends) for r in range(end - 1 - plan.scheduled[i].num_drafts, end)]
        logits = self.model.compute_logits(hidden[rows])
        return StepOutput(hidden, logits, sample_rows, batch)

    def keep_accepted_state(self, plan: SchedulerPlan, num_accepted: list[int]) -> None:
        """After verification: layers with per-sequence state (GDN) go back to the state after
        each verified request's accepted tokens, as if the rejected drafts had never been seen.
        num_accepted[i] belongs to plan.scheduled[i] (0 for requests without drafts)."""
        kept = {i: 1 + n for i, (item, n) in enumerate(zip(plan.scheduled, num_accepted)) if n < item.num_drafts}
        for layer in self.state_layers:
            layer.restore_verified(kept)
