"""Turn one step's logits into tokens: logits processors, sampling, logprobs (vLLM semantics).

The pipeline for a batch of N rows (one row per sequence that needs a token this step):

    raw logits --penalties, min_tokens, per-request processors (grammar masks)--> (greedy rows: argmax)
               --temperature, min_p, top_k, top_p--> probabilities --one uniform per row--> token

The order is vLLM v1's: penalties and masks first, then temperature, min_p, top_k and top_p (top_p on
the distribution the earlier filters left). Logprobs are vLLM's default `raw_logprobs`: log-softmax of
the model's logits before any processing.

`apply_logits_processors` is its own function because speculative verification needs the processed
distribution of the target model, not just a sampled token.

Work is vectorized across rows; a filter costs nothing for a batch in which no row uses it. A row is
drawn by inverse-CDF sampling from a single uniform number, taken from the row's own
`torch.Generator` when the request is seeded, so a seeded request gives the same tokens whatever
else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fp4serve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated before this step
    generator: torch.Generator | None  # seeded from params.seed by the engine; None: global RNG
    eos_token_ids: frozenset[int]  # masked while len(output) < min_tokens, unless ignore_eos


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token (tokens tied with it count as better)
    top: list[tuple[int, float]]  # the params.logprobs most likely tokens, best first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for rows that did not ask for logprobs


def apply_logits_processors(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Return a float32 copy of `logits` [N, V] with every row's processing applied.

    Tokens outside a row's support are -inf, so softmax of a non-greedy row is the distribution it
    samples from. Greedy rows get penalties and masks only: temperature and truncation cannot change
    their argmax.
    """
    logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    _apply_penalties(logits, rows)
    _mask_stop_tokens_before_min_tokens(logits, rows)
    _apply_request_processors(logits, rows)
    _apply_temperature_and_truncation(logits, [row.params for row in rows])
    return logits


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """Pick one token per row of `logits` [N, V] and compute the logprobs the rows asked for."""
    processed = apply_logits_processors(logits, rows)
    token_ids = _draw(processed, rows)
    return SamplerOutput(token_ids=token_ids.tolist(), logprobs=compute_logprobs(logits, token_ids, rows))


def _select(x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """x[index], without the copy advanced indexing makes when `index` is every row (the usual case)."""
    return x if index == list(range(x.shape[0])) else x[index]


# --- penalties and masks (all rows) ---------------------------------------------------------


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition (prompt + output), frequency and presence (output) penalties, in place.

    Only the logits of tokens a row has seen change, so they are gathered by flat position
    (row * V + token id) instead of building dense [N, V] masks: the cost follows the sequence
    lengths, not the vocabulary.
    """
    penalized = [i for i, row in enumerate(rows) if _has_penalties(row.params)]
    if not penalized:
        return
    device, vocab = logits.device, logits.shape[1]
    flat = logits.view(-1)
    output_pos, output_counts = torch.unique(
        _flat_positions({i: rows[i].output_token_ids for i in penalized}, vocab, device), return_counts=True
    )
    prompt_pos = _flat_positions({i: rows[i].prompt_token_ids for i in penalized}, vocab, device)
    seen = torch.unique(torch.cat([prompt_pos, output_pos]))

    repetition = torch.tensor([row.params.repetition_penalty for row in rows], device=device)[seen // vocab]
    values = flat[seen]
    # The repetition penalty makes a seen token less likely whatever the sign of its logit.
    flat[seen] = torch.where(values > 0, values / repetition, values * repetition)

    output_rows = output_pos // vocab
    frequency = torch.tensor([row.params.frequency_penalty for row in rows], device=device)[output_rows]
    presence = torch.tensor([row.params.presence_penalty for row in rows], device=device)[output_rows]
    flat[output_pos] -= frequency * output_counts + presence


def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _flat_positions(token_ids_by_row: dict[int, list[int]], vocab: int, device) -> torch.Tensor:
    """int64 positions row * vocab + token id of every listed token, duplicates included."""
    parts = [row * vocab + torch.tensor(ids, dtype=torch.long) for row, ids in token_ids_by_row.items() if ids]
    return torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.long, device=device)


def _column(values: list[float], device) -> torch.Tensor:
    """[len(values), 1] float32, to broadcast one value per row across the vocabulary."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _mask_stop_tokens_before_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    row_ids, token_ids = [], []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) >= row.params.min_tokens:
            continue
        # With ignore_eos, EOS does not end the sequence, so there is nothing to hold back.
        blocked = set(row.params.stop_token_ids) | (set() if row.params.ignore_eos else row.eos_token_ids)
        row_ids += [i] * len(blocked)
        token_ids += sorted(blocked)
    if token_ids:
        device = logits.device
        logits[torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)] = -math.inf


def _apply_request_processors(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Per-request processors (SamplingParams.logits_processors), each on its own row, in place."""
    for i, row in enumerate(rows):
        for processor in row.params.logits_processors or ():
            processor(row.output_token_ids, logits[i : i + 1])


# --- temperature and truncation (non-greedy rows) --------------------------------------------


def _apply_temperature_and_truncation(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """Temperature, then min_p, top_k and top_p, in place; greedy rows are left alone."""
    device, vocab = logits.device, logits.shape[1]
    if any(not p.greedy and p.temperature != 1.0 for p in params):
        logits /= _column([1.0 if p.greedy else p.temperature for p in params], device)

    rows = [i for i, p in enumerate(params) if not p.greedy and p.min_p > 0]
    _filter_rows(logits, rows, _min_p_, _column([params[i].min_p for i in rows], device))
    rows = [i for i, p in enumerate(params) if not p.greedy and 0 < p.top_k < vocab]
    _filter_rows(logits, rows, _top_k_, torch.tensor([params[i].top_k for i in rows], device=device))
    rows = [i for i, p in enumerate(params) if not p.greedy and p.top_p < 1]
    _filter_rows(logits, rows, _top_p_, _column([params[i].top_p for i in rows], device))


def _filter_rows(logits: torch.Tensor, rows: list[int], filter_, values: torch.Tensor) -> None:
    """Run the in-place `filter_(logits[rows], values)` on `logits` itself; skip it if no row needs it."""
    if not rows:
        return
    sub = _select(logits, rows)
    filter_(sub, values)
    if sub is not logits:
        logits[rows] = sub


def _min_p_(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens with prob < min_p * max_prob; compared in log space, so no softmax is needed."""
    floor = logits.amax(dim=1, keepdim=True) + torch.log(min_p)
    logits.masked_fill_(logits < floor, -math.inf)


def _top_k_(logits: torch.Tensor, k: torch.Tensor) -> None:
    """Keep the k largest logits of each row (tokens tied with the k-th are kept too, as in vLLM)."""
    top = logits.topk(int(k.max()), dim=1).values
    kth = top.gather(1, (k - 1).unsqueeze(1))
    logits.masked_fill_(logits < kth, -math.inf)


def _top_p_(logits: torch.Tensor, top_p: torch.Tensor) -> None:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    probs = logits.softmax(dim=1)
    head = int((probs >= _nucleus_floor(probs, top_p)).sum(dim=1, dtype=torch.int32).max())
    head_probs, head_ids = probs.topk(head, dim=1)  # sorted, most likely first
    mass_before = head_probs.cumsum(dim=1) - head_probs
    # The most likely token has mass_before == 0 < top_p, so at least one token always survives.
    in_nucleus = mass_before < top_p
    outside = torch.ones_like(logits, dtype=torch.bool).scatter_(1, head_ids, ~in_nucleus)
    logits.masked_fill_(outside, -math.inf)


_NUCLEUS_SEARCH_STEPS = 8


def _nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[M, 1] probability floors with each row's nucleus at or above it, and few other tokens.

    Sorting a whole 50k-token row is slow on a CPU, so only the tokens at or above this floor are
    sorted. If the tokens at or above a floor f carry top_p, the nucleus is among them. The sum of
    relu(p - f) is a lower bound of their mass that costs a single fast pass, so any floor where the
    bound reaches top_p is safe. f = (1 - top_p) / 2V is: the tokens below it carry less than
    (1 - top_p) / 2, and subtracting f from each of the others takes at most (1 - top_p) / 2 more.
    A few bisection steps in log space raise the floor as far as the bound allows.
    """
    low = (1 - top_p) / (2 * probs.shape[1])
    high = probs.amax(dim=1, keepdim=True)
    for _ in range(_NUCLEUS_SEARCH_STEPS):
        middle = (low * high).sqrt()
        enough = (probs - middle).relu_().sum(dim=1, keepdim=True) >= top_p
        low, high = torch.where(enough, middle, low), torch.where(enough, high, middle)
    return low


# --- drawing tokens and logprobs -------------------------------------------------------------


def _draw(processed: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[N] int64: argmax for greedy rows, a draw from softmax(processed) for the others."""
    token_ids = torch.empty(len(rows), dtype=torch.long, device=processed.device)
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    if greedy:
        token_ids[greedy] = _select(processed, greedy).argmax(dim=1)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random_rows:
        probs = _select(processed, random_rows).softmax(dim=1)
        uniform = _uniforms([rows[i] for i in random_rows], processed.device)
        token_ids[random_rows] = inverse_cdf(probs, uniform)
    return token_ids


def _uniforms(rows: list[SamplingRow], device) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row; a seeded row's comes from its own generator, once."""
    uniform = torch.rand(len(rows), dtype=torch.float64, device=device)
    for i, row in enumerate(rows):
        if row.generator is not None:
            uniform[i] = torch.rand(1, dtype=torch.float64, device=device, generator=row.generator)[0]
    return uniform


_BLOCK = 256  # tokens per block of the two-level inverse CDF


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """[M] token ids, row m drawn from probs[m] (zeros allowed; the total need not be exactly 1).

    Two levels: pick a block of (up to) _BLOCK tokens by the blocks' masses, then a token inside the
    block by a float64 running sum. Rounding then shifts a token's chance by at most ~2^-24 of its
    own block's mass. One float32 running sum over the vocabulary would shift every token by up to
    2^-24 of the whole (dropping all tokens below ~3e-8), and a float64 one is several times slower.
    """
    m, vocab = probs.shape
    block_size = min(_BLOCK, vocab)
    if vocab % block_size:
        probs = torch.nn.functional.pad(probs, (0, -vocab % block_size))  # zero mass: never drawn
    blocks = probs.view(m, -1, block_size)
    block_cdf = blocks.sum(dim=2).to(torch.float64).cumsum(dim=1)
    # 1 - u lies in (0, 1], so the target lies in (0, total]: the first cdf entry >= target exists
    # and is reached by a step of positive mass, in both levels.
    target = (1 - uniform).unsqueeze(1) * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, target)  # [M, 1]
    start = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    fraction = ((target - start) / (block_cdf.gather(1, block) - start)).clamp(max=1.0)
    inner = blocks.gather(1, block.unsqueeze(2).expand(m, 1, block_size)).squeeze(1)
    # The inner sums may differ from the block's mass in the last bits: aim by fraction, not value.
    inner_cdf = inner.cumsum(dim=1, dtype=torch.float64)
    token = torch.searchsorted(inner_cdf, fraction * inner_cdf[:, -1:])
    return (block * block_size + token).squeeze(1)


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]) -> list[TokenLogprobs | None]:
    """vLLM's raw logprobs: log-softmax of the unprocessed logits, for the rows that asked."""
    result: list[TokenLogprobs | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    logprobs = _select(logits, wanted).float().log_softmax(dim=1)
    entries = token_logprobs(logprobs, token_ids[wanted], [rows[i].params.logprobs for i in wanted])
    for i, entry in zip(wanted, entries):
        result[i] = entry
    return result


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """Row m of log-softmaxed `logprobs` [M, V]: the entry of token_ids[m] with its rank and the
    num_top[m] most likely tokens (sampled tokens and prompt logprobs share this)."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs >= chosen).sum(dim=1, dtype=torch.int32)  # int32: a faster sum than int64
    top_values, top_ids = logprobs.topk(max(num_top), dim=1)
    # One device-to-host copy per tensor, then plain Python per row.
    chosen_ids, chosen, ranks = token_ids.tolist(), chosen.squeeze(1).tolist(), ranks.tolist()
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(
            token_id=chosen_ids[m], logprob=chosen[m], rank=ranks[m], top=list(zip(top_ids[m][:n], top_values[m][:n]))
        )
        for m, n in enumerate(num_top)
    ]
