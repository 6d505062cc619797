"""Prompt logprobs (vLLM's `prompt_logprobs`): for every prompt position p > 0, the logprob of
prompt token p given the tokens before it, with its rank and the top-k alternatives.

The hidden state of row p - 1 predicts token p, so a prefill chunk over positions [start, end)
gives the entries of tokens start + 1 .. end (the last prompt row predicts the first output token,
which the sampler handles). They are vLLM's raw logprobs, like the sampled tokens' (sampler.py):
log-softmax of the model's logits, before penalties, temperature or any other processing. Logits
are computed a slice of rows at a time, so a long prompt never holds [P, V] float32 logits at once.
"""

from __future__ import annotations

import torch

from fp4serve.sample.sampler import TokenLogprobs, token_logprobs

SLICE_ELEMENTS = 2**24  # float32 logits per slice: 64 MiB


def positions_to_record(prompt_logprobs: list, num_prompt_tokens: int, start: int, num_tokens: int) -> range:
    """Rows (as positions) of a chunk [start, start + num_tokens) whose logits give prompt tokens
    not recorded yet; a request recomputed after preemption records nothing twice."""
    first = max(start, len(prompt_logprobs) - 1)
    return range(first, min(start + num_tokens, num_prompt_tokens - 1))


@torch.inference_mode()
def compute_prompt_logprobs(
    compute_logits, hidden: torch.Tensor, next_ids: list[int], num_top: int, vocab_size: int
) -> list[TokenLogprobs]:
    """hidden [M, H]: the rows before the tokens next_ids [M]; compute_logits: the model's head."""
    rows_per_slice = max(1, SLICE_ELEMENTS // vocab_size)
    entries = []
    for begin in range(0, len(next_ids), rows_per_slice):
        end = begin + rows_per_slice
        logprobs = compute_logits(hidden[begin:end]).float().log_softmax(dim=1)
        targets = torch.tensor(next_ids[begin:end], dtype=torch.long, device=logprobs.device)
        entries += token_logprobs(logprobs, targets, [num_top] * len(targets))
    return entries


def record_prompt_logprobs(plan, step, compute_logits, vocab_size: int, guarded) -> None:
    """Append this step's prompt logprobs to each scheduled request that asked for them.
    guarded(request, stage, fn, *args): runs fn so that, should it raise, only that request fails."""
    for i, item in enumerate(plan.scheduled):
        request = item.request
        if request.prompt_logprobs is None:
            continue
        start = request.num_computed_tokens  # not yet committed: the chunk's first position
        positions = positions_to_record(request.prompt_logprobs, request.num_prompt_tokens, start, item.num_tokens)
        if not positions:
            continue
        rows = step.hidden[step.batch.seq_rows(i)][positions.start - start : positions.stop - start]
        next_ids = request.prompt_token_ids[positions.start + 1 : positions.stop + 1]
        entries = guarded(request, "prompt logprobs", compute_prompt_logprobs,
                          compute_logits, rows, next_ids, request.params.prompt_logprobs, vocab_size)  # fmt: skip
        if entries is not None:
            request.prompt_logprobs += entries
