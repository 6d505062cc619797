"""Lossless verification of draft tokens (REFERENCE.md section 7).

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

from dataclasses import dataclass

import torch

from fp4serve.engine.sampler import SamplingRow, TokenLogprobs, apply_logits_processors, compute_logprobs, inverse_cdf


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
    expanded, owner = [], []
    for i, (row, draft) in enumerate(zip(rows, drafts)):
        for j in range(len(draft) + 1):
            # At position j the drafts before it count as already generated output.
            output = row.output_token_ids + draft[:j] if j else row.output_token_ids
            expanded.append(SamplingRow(row.params, row.prompt_token_ids, output, row.generator, row.eos_token_ids))
            owner.append(i)
    processed = apply_logits_processors(logits, expanded)
    device = logits.device
    greedy_ids = processed.argmax(dim=1).tolist() if any(r.params.greedy for r in rows) else None

    token_ids: list[list[int]] = []
    emitted_rows: list[int] = []  # the logits row of every emitted token, for logprobs
    start = 0
    for i, (row, draft) in enumerate(zip(rows, drafts)):
        k = len(draft)
        if row.params.greedy:
            accepted = 0
            while accepted < k and draft[accepted] == greedy_ids[start + accepted]:
                accepted += 1
            tokens = draft[:accepted] + [greedy_ids[start + accepted]]
        else:
            q = draft_probs[i] if draft_probs is not None else None
            tokens = _verify_random(processed[start : start + k + 1], draft, q, row.generator, device)
        token_ids.append(tokens)
        emitted_rows += range(start, start + len(tokens))
        start += k + 1

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


def _verify_random(processed: torch.Tensor, draft: list[int], q: torch.Tensor | None, generator, device) -> list[int]:
    """One sampled request: processed [k + 1, V] (already temperature-scaled and truncated)."""
    k = len(draft)
    probs = processed.softmax(dim=1, dtype=torch.float64) if k else processed.softmax(dim=1)
    if k:
        uniforms = torch.rand(k + 1, dtype=torch.float64, device=device, generator=generator)
        ids = torch.tensor(draft, device=device)
        p_draft = probs[:k].gather(1, ids[:, None])[:, 0]
        q_draft = torch.ones_like(p_draft) if q is None else q.to(torch.float64).gather(1, ids[:, None])[:, 0]
        # u < p/q  <=>  accepted with probability min(1, p/q)
        rejected = (uniforms[:k] * q_draft >= p_draft).tolist()
        accepted = rejected.index(True) if True in rejected else k
        if accepted < k:
            if q is None:
                residual = probs[accepted].clone()
                residual[draft[accepted]] = 0.0
            else:
                residual = (probs[accepted] - q[accepted].to(torch.float64)).clamp_(min=0)
            dist = residual
        else:
            dist = probs[k]
        u = uniforms[k : k + 1]
    else:
        accepted, dist = 0, probs[0]
        u = torch.rand(1, dtype=torch.float64, device=device, generator=generator)
    token = int(inverse_cdf(dist[None].float(), u)[0])
    return draft[:accepted] + [token]
