"""ModelRunner: plan -> ForwardBatch -> model -> StepOutput (logits of the rows that sample, and
what verification and drafters need from the step). Owns no policy."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4serve.engine.decode_graphs import DecodeGraphs
from fp4serve.engine.request import Request
from fp4serve.engine.scheduler import SchedulerPlan, SnapshotJob
from fp4serve.forward_batch import ForwardBatch, SequenceRows, StepCaptures, build_batch
from fp4serve.layers.cache_spec import StateSpec
from fp4serve.multimodal.encoder_cache import EncoderCache


@dataclass
class StepOutput:
    """Everything one forward produced; nothing of it stays on the model's modules."""

    batch: ForwardBatch  # what the model ran (drafters reuse its positions and KV slots)
    hidden: torch.Tensor  # [T, H] every scheduled token, after the final norm
    logits: torch.Tensor  # [sum(1 + k_i), V] in the model dtype: for each of sample_rows, 1 + its drafts rows
    sample_rows: list[int]  # index into plan.scheduled of each request that samples

    @property
    def captures(self) -> StepCaptures:
        """Hidden-state taps and GDN per-position states of verified sequences."""
        return self.batch.captures


class ModelRunner:
    """capture_layers: target decoder layers whose outputs a drafter reads (StepOutput.captures).
    calibrate_kv_scales: the first forward sets a quantized KV cache's scales from its amax.
    encoder_cache: an image-text model's vision-tower outputs (None: the model takes no images).
    graphs: captured decode steps (CUDA), which run the decode steps they cover."""

    def __init__(
        self,
        model,
        block_size: int,
        device: torch.device,
        capture_layers: tuple[int, ...] = (),
        calibrate_kv_scales: bool = False,
        encoder_cache: EncoderCache | None = None,
        graphs: DecodeGraphs | None = None,
    ):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.capture_layers = capture_layers
        self.calibrate_kv_scales = calibrate_kv_scales
        self.state_layers = [m for m in model.cache_layers() if isinstance(m.cache_spec(), StateSpec)]
        self.encoder_cache = encoder_cache
        self.graphs = graphs

    def prepare(self, plan: SchedulerPlan) -> ForwardBatch:
        seqs = []
        embeddings = self._image_embeddings(plan)
        for item in plan.scheduled:
            request, start = item.request, item.request.num_computed_tokens
            end = start + item.num_tokens
            ids = request.token_ids_in(start, end - item.num_drafts) + item.draft_token_ids
            slot = request.state_slot if request.state_slot is not None else 0
            mrope, embeds = None, ()
            if request.mm is not None:
                mrope = request.mm.mrope_rows(start, end)
                embeds = tuple(self._image_rows(request, start, end, embeddings))
            seqs.append(SequenceRows(ids, start, request.block_ids, slot, item.num_drafts, mrope, embeds))
        calibrate, self.calibrate_kv_scales = self.calibrate_kv_scales, False  # once: on the first forward
        return build_batch(
            seqs, self.block_size, self.device, capture_layers=self.capture_layers, calibrate_kv_scales=calibrate
        )

    def _image_embeddings(self, plan: SchedulerPlan) -> dict[str, torch.Tensor]:
        """Tower outputs of every image with tokens in this step, by digest (encoded once, together)."""
        images = [
            placed.image
            for item in plan.scheduled
            if item.request.mm is not None
            for placed in item.request.mm.images_in(item.request.num_computed_tokens,
                                                    item.request.num_computed_tokens + item.num_tokens)
        ]  # fmt: skip
        return self.encoder_cache.embeddings(images) if images else {}

    @staticmethod
    def _image_rows(request: Request, start: int, end: int, embeddings: dict[str, torch.Tensor]):
        """(row within the step's rows of this request, embeddings) for each image part in start..end."""
        for placed in request.mm.images_in(start, end):
            first, last = max(placed.offset, start), min(placed.end, end)
            rows = embeddings[placed.image.digest][first - placed.offset : last - placed.offset]
            yield first - start, rows

    @torch.inference_mode()
    def execute(self, plan: SchedulerPlan) -> StepOutput:
        if plan.restores:  # prefix hits on a hybrid model: GDN state from the snapshot at the hit's end
            for layer in self.state_layers:
                layer.copy_slots([s for s, _ in plan.restores], [slot for _, slot in plan.restores])
        batch = self.prepare(plan)
        hidden = self.graphs.run(batch) if self.graphs is not None else None
        if hidden is None:
            hidden = self.model(batch)
        sample_rows = [i for i, item in enumerate(plan.scheduled) if item.samples]
        # A verified request needs logits at its last token and at each draft (1 + k rows).
        ends = [batch.query_start[i + 1] for i in sample_rows]
        rows = [r for i, end in zip(sample_rows, ends) for r in range(end - 1 - plan.scheduled[i].num_drafts, end)]
        logits = self.model.compute_logits(hidden[rows])
        return StepOutput(batch, hidden, logits, sample_rows)

    def keep_accepted_state(self, step: StepOutput, num_accepted: list[int]) -> None:
        """After verification: layers with per-sequence state (GDN) go back to the state after
        each verified sequence's accepted tokens, as if the rejected drafts had never been seen.
        num_accepted[i] belongs to sequence i of step.batch (0 for sequences without drafts)."""
        drafts = step.batch.num_drafts
        kept = {i: 1 + n for i, (k, n) in enumerate(zip(drafts, num_accepted)) if n < k}
        for layer, verified in step.captures.verified.items():
            layer.restore_verified(verified, kept)

    @torch.inference_mode()
    def save_snapshots(self, plan: SchedulerPlan, step: StepOutput, jobs: list[SnapshotJob]) -> None:
        """After keep_accepted_state and the commit: fill the GDN snapshots the scheduler took, from
        the sequence's slot (the state at the end of its committed tokens) or, for a verified
        sequence, from the step's per-token captures."""
        index = {id(item): i for i, item in enumerate(plan.scheduled)}
        for layer in self.state_layers:
            verified = step.captures.verified.get(layer, {})
            sources, targets = [], []
            for job in jobs:
                i = index[id(job.item)]
                if i in verified:
                    layer.save_verified(verified[i], job.num_tokens, job.slot)
                else:
                    assert job.num_tokens == step.batch.query_lens[i], "a mid-step snapshot needs the step's captures"
                    sources.append(int(step.batch.state_slots[i]))
                    targets.append(job.slot)
            if sources:
                layer.copy_slots(sources, targets)
