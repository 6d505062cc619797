"""Lossless verification of draft tokens (docs/reference.md section 7).

A request with drafts d_1..d_k has k + 1 logits rows: row j is the target's prediction for the
position of d_{j+1} (row k: the bonus position after the last draft). Each row is processed exactly
as normal sampling would process it at that position (penalties see the drafts before it as output),
so the target distribution p_j is the one the plain sampler would sample from.

- Greedy rows: accept drafts while d_{j+1} == argmax p_j; then emit argmax at the first mismatch,
  or the bonus argmax p_k when all match. Token-identical to decoding without drafts.
- Random rows: accept d_{j+1} with probability min(1, p_j(d)/q_j(d)); at the first rejection emit a
  draw from normalize(max(p_j - q_j, 0)); if all are accepted, a draw from p_k. q_j is one-hot on
  d_{j+1} for argmax drafters (n-gram, MTP and DFlash here): accept with probability p_j(d), and on
  rejection draw from p_j with d removed. Each emitted token is then distributed as p exactly.

A request without drafts is one row: a plain draw, so a batch may mix both kinds."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from fp4serve.sample.sampler import SamplingRow, TokenLogprobs, apply_logits_processors, compute_logprobs, inverse_cdf


@dataclass
class VerifyOutput:
    token_ids: list[list[int]]  # per request: accepted drafts then one target token
    num_accepted: list[int]  # per request: drafts accepted (len(token_ids[i]) - 1)
    logprobs: list[list[TokenLogprobs] | None]  # per request and emitted token, when asked


def verify(
    logits: torch.Tensor,
    rows: list[SamplingRow],
    drafts: list[list[int]],
    draft_probs: list[torch.Tensor | None] | None = None,
) -> VerifyOutput:
    """logits [sum(k_i + 1), V]: request i's k_i + 1 rows in order. draft_probs[i] is the drafter's
    [k_i, V] distribution, or None for one-hot (argmax) drafts."""
    expanded = []
    for row, draft in zip(rows, drafts):
        for j in range(len(draft) + 1):
            # At position j the drafts before it count as already generated output.
            output = row.output_token_ids + draft[:j] if j else row.output_token_ids
            expanded.append(SamplingRow(row.params, row.prompt_token_ids, output, row.generator, row.eos_token_ids))
    processed = apply_logits_processors(logits, expanded)
    device = logits.device
    greedy_ids = processed.argmax(dim=1).tolist() if any(r.params.greedy for r in rows) else None

    starts = [0]
    for draft in drafts:
        starts.append(starts[-1] + len(draft) + 1)
    token_ids: list[list[int]] = [[] for _ in rows]
    for i, (row, draft) in enumerate(zip(rows, drafts)):
        if row.params.greedy:
            accepted, base = 0, starts[i]
            while accepted < len(draft) and draft[accepted] == greedy_ids[base + accepted]:
                accepted += 1
            token_ids[i] = draft[:accepted] + [greedy_ids[base + accepted]]
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        _verify_sampled(processed, rows, drafts, draft_probs, starts, sampled, token_ids)
    emitted_rows = [r for i, tokens in enumerate(token_ids) for r in range(starts[i], starts[i] + len(tokens))]

    logprobs: list[list[TokenLogprobs] | None] = [None] * len(rows)
    if any(r.params.logprobs is not None for r in rows):
        flat = [t for tokens in token_ids for t in tokens]
        lp = compute_logprobs(logits[emitted_rows], torch.tensor(flat, device=device), [expanded[r] for r in emitted_rows])
        pos = 0
        for i, tokens in enumerate(token_ids):
            if rows[i].params.logprobs is not None:
                logprobs[i] = lp[pos : pos + len(tokens)]
            pos += len(tokens)
    return VerifyOutput(token_ids, [len(t) - 1 for t in token_ids], logprobs)


def _verify_sampled(processed, rows, drafts, draft_probs, starts, sampled: list[int], token_ids) -> None:
    """Rejection sampling for the non-greedy requests `sampled`, vectorized over them; fills token_ids."""
    device = processed.device
    row_ids = [r for i in sampled for r in range(starts[i], starts[i + 1])]
    probs = processed[row_ids].softmax(dim=1)
    local = {i: n for i, n in zip(sampled, itertools.accumulate([0] + [len(drafts[i]) + 1 for i in sampled]))}
    uniforms = _uniforms([rows[i] for i in sampled], [len(drafts[i]) + 1 for i in sampled], device)
    draft_rows = [local[i] + j for i in sampled for j in range(len(drafts[i]))]
    draft_ids = torch.tensor([t for i in sampled for t in drafts[i]], dtype=torch.long, device=device)
    p_draft = probs[draft_rows].gather(1, draft_ids[:, None])[:, 0] if draft_rows else probs.new_empty(0)
    q_all = None
    if draft_probs is not None and any(draft_probs[i] is not None for i in sampled):
        one_hot = [torch.nn.functional.one_hot(torch.tensor(drafts[i], device=device), probs.shape[1]).float()
                   for i in sampled]  # fmt: skip
        q_all = torch.cat([q.to(probs) if (q := draft_probs[i]) is not None else one_hot[n] for n, i in enumerate(sampled)])
    q_draft = torch.ones_like(p_draft) if q_all is None else q_all.gather(1, draft_ids[:, None])[:, 0]
    u_draft = uniforms[draft_rows]
    # u < p/q  <=>  accepted with probability min(1, p/q)
    rejected = (u_draft * q_draft >= p_draft).tolist()
    final_rows, residual_rows, pos, q_pos = [], [], 0, []
    accepted_of = {}
    for i in sampled:
        k = len(drafts[i])
        flags = rejected[pos : pos + k]
        accepted = flags.index(True) if True in flags else k
        accepted_of[i] = accepted
        final_rows.append(local[i] + accepted)
        if accepted < k:
            residual_rows.append(len(final_rows) - 1)
            q_pos.append(pos + accepted)
        pos += k
    dist = probs[final_rows]
    if residual_rows:
        res = torch.tensor(residual_rows, device=device)
        q_rows = torch.tensor(q_pos, device=device)
        if q_all is None:  # one-hot q: p with the rejected draft removed
            dist[res, draft_ids[q_rows]] = 0.0
        else:
            dist[res] = (dist[res] - q_all[q_rows]).clamp_(min=0)
    # The last uniform of each request, never one an acceptance test used: conditioned on a
    # rejection that one is no longer uniform.
    drawn = inverse_cdf(dist, uniforms[[local[i] + len(drafts[i]) for i in sampled]]).tolist()
    for n, i in enumerate(sampled):
        token_ids[i] = drafts[i][: accepted_of[i]] + [drawn[n]]


def _uniforms(rows, counts: list[int], device) -> torch.Tensor:
    """counts[i] float64 uniforms per row, concatenated; a seeded row's come from its own generator."""
    uniforms = torch.rand(sum(counts), dtype=torch.float64, device=device)
    start = 0
    for row, n in zip(rows, counts):
        if row.generator is not None:
            uniforms[start : start + n] = torch.rand(n, dtype=torch.float64, device=device, generator=row.generator)
        start += n
    return uniforms
