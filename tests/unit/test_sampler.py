"""The sampler against hand-computed expectations and, for the random draws, chi-square tests."""

from __future__ import annotations

import math

import pytest
import torch

from fp4serve.sample.sampler import SamplingRow, apply_logits_processors, inverse_cdf, sample
from fp4serve.sampling_params import SamplingParams

EOS = 7
# A known distribution over 8 tokens, most likely first.
PROBS = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.07, 0.05, 0.02, 0.01])


def row(prompt=(), output=(), seed=None, eos=(EOS,), **params) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), generator, frozenset(eos))


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic of `counts` against `probs` (tokens with probs > 0)."""
    support = probs > 0
    expected = probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0  # a single possible token: nothing to test beyond the support
    return float(torch.special.gammaincc(torch.tensor(dof / 2), statistic / 2))


def draw_counts(probs: torch.Tensor, n: int = 20_000, **params) -> torch.Tensor:
    """Token counts from n rows that all sample from log(probs) with `params`, in one batch."""
    logits = probs.log().expand(n, -1)
    rows = [row(eos=(), **params)] * n
    return torch.bincount(torch.tensor(sample(logits, rows).token_ids), minlength=probs.numel()).float()


def renormalized(probs: torch.Tensor, keep: list[int]) -> torch.Tensor:
    out = torch.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


@pytest.mark.parametrize(
    "params, keep",
    [
        ({"top_k": 3}, [0, 1, 2]),
        ({"top_p": 0.7}, [0, 1, 2]),  # 0.35 + 0.25 < 0.7 <= 0.75
        ({"top_p": 0.1}, [0]),  # the most likely token always survives
        ({"min_p": 0.25}, [0, 1, 2, 3]),  # p >= 0.25 * 0.35
        # vLLM's order: min_p first, then top_p on what is left (0.35/0.85 + 0.25/0.85 >= 0.7).
        ({"min_p": 0.25, "top_p": 0.7}, [0, 1]),
        # top_p over the renormalized top 5 (0.35/0.92 + 0.25/0.92 + 0.15/0.92 >= 0.8); alone it keeps 4.
        ({"top_k": 5, "top_p": 0.8}, [0, 1, 2]),
        ({}, list(range(8))),
    ],
)
def test_truncation_restricts_the_support_and_keeps_proportions(params, keep):
    want = renormalized(PROBS, keep)
    processed = apply_logits_processors(PROBS.log().unsqueeze(0), [row(eos=(), **params)])
    torch.testing.assert_close(processed.softmax(dim=1)[0], want)

    counts = draw_counts(PROBS, **params)
    assert counts[want == 0].sum() == 0
    assert chi_square_p_value(counts, want) > 1e-3


def test_top_p_matches_the_sort_based_rule_on_large_vocabularies():
    """The nucleus search sorts only a head of each row; it must keep exactly what vLLM's full
    ascending sort keeps (drop the prefix whose mass is <= 1 - top_p, never the last token)."""
    torch.manual_seed(0)
    scales = torch.tensor([0.3, 1.0, 3.0, 8.0]).repeat_interleave(12).unsqueeze(1)
    logits = torch.randn(48, 5000) * scales
    top_p = [0.05, 0.5, 0.9, 0.99] * 12
    processed = apply_logits_processors(logits, [row(top_p=p) for p in top_p])

    ascending, order = logits.sort(dim=1)
    drop = ascending.softmax(dim=1).cumsum(dim=1) <= 1 - torch.tensor(top_p).unsqueeze(1)
    drop[:, -1] = False
    want_kept = ~torch.zeros_like(drop).scatter_(1, order, drop)
    assert torch.equal(torch.isfinite(processed), want_kept)
    torch.testing.assert_close(processed[want_kept], logits[want_kept])


def test_temperature_reshapes_the_distribution():
    want = PROBS**0.5 / (PROBS**0.5).sum()  # temperature 2 == square root of the probabilities
    processed = apply_logits_processors(PROBS.log().unsqueeze(0), [row(temperature=2.0)])
    torch.testing.assert_close(processed.softmax(dim=1)[0], want)
    assert chi_square_p_value(draw_counts(PROBS, temperature=2.0), want) > 1e-3


def test_draws_over_a_large_vocabulary_with_scattered_support():
    """The two-level inverse CDF with a vocabulary that is not a multiple of its block size,
    support in the first, last and block-boundary positions, and zeros everywhere else."""
    vocab = 1000
    tokens = torch.tensor([0, 255, 256, 511, 700, 999])
    probs = torch.zeros(vocab)
    probs[tokens] = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    counts = draw_counts(probs, n=20_000)
    assert counts.sum() == counts[tokens].sum()
    assert chi_square_p_value(counts, probs) > 1e-3


def test_inverse_cdf_gives_each_token_exactly_its_share_of_the_unit_interval():
    """Uniforms on a fine grid land on each token in proportion to its probability."""
    probs = torch.zeros(600)  # blocks of 256, the last one padded
    probs[[3, 299, 300, 599]] = torch.tensor([0.5, 0.25, 0.25, 1e-9])
    grid = 10_000
    uniform = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    counts = torch.bincount(inverse_cdf(probs.expand(grid, -1), uniform), minlength=600).double()
    assert (counts - probs.double() * grid).abs().max() <= 1


def test_inverse_cdf_ends_and_tiny_tokens():
    """u -> 0 reaches the last token of positive probability and u -> 1 the first. A 1e-9 token,
    far below float32's resolution of the total, keeps its own share [0, 1e-9) of the interval."""
    probs = torch.zeros(600)
    probs[[3, 299, 599]] = torch.tensor([0.75, 0.25, 1e-9])
    uniform = torch.tensor([0.0, 0.5e-9, 2e-9, 0.1, 0.5, 1 - 2**-53], dtype=torch.float64)
    tokens = inverse_cdf(probs.expand(len(uniform), -1), uniform)
    assert tokens.tolist() == [599, 599, 299, 299, 3, 3]


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    rows = [row(temperature=0.0), row(top_k=1), row(temperature=1e-6), row(temperature=0.0, top_p=0.5)]
    assert sample(logits, rows).token_ids == logits.argmax(dim=1).tolist()


def test_greedy_rows_get_penalties_and_masks_but_no_truncation():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    processed = apply_logits_processors(logits, [row(temperature=0.0, top_k=2, min_p=0.9, eos=())])
    torch.testing.assert_close(processed, logits)


def test_penalties_match_a_hand_computed_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    params = {"repetition_penalty": 2.0, "frequency_penalty": 0.5, "presence_penalty": 0.25, "temperature": 0.0}
    processed = apply_logits_processors(logits, [row(prompt=[0, 1], output=[2, 2, 3], eos=(), **params)])
    want = [
        2.0 / 2,  # in the prompt, positive: divided
        -1.0 * 2,  # in the prompt, negative: multiplied
        0.5 / 2 - 0.5 * 2 - 0.25,  # generated twice
        -0.5 * 2 - 0.5 * 1 - 0.25,  # generated once
        3.0,  # never seen
        1.0,
    ]
    torch.testing.assert_close(processed[0], torch.tensor(want))


def test_penalties_apply_per_row_and_before_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    rows = [row(output=[0], presence_penalty=1.0, temperature=0.5, eos=()), row(output=[0], temperature=0.5, eos=())]
    processed = apply_logits_processors(logits, rows)
    torch.testing.assert_close(processed, torch.tensor([[2.0, 2.0, 0.0], [4.0, 2.0, 0.0]]))
    assert logits[0, 0] == 2.0  # the caller's logits are untouched


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    logits[0, 3] = 9.0
    logits[0, 5] = 8.0
    params = {"temperature": 0.0, "min_tokens": 2, "stop_token_ids": [3]}
    assert sample(logits, [row(output=[1], **params)]).token_ids == [5]
    assert sample(logits, [row(output=[1, 1], **params)]).token_ids == [EOS]
    # With ignore_eos, EOS ends nothing, so it is not held back; the stop token still is.
    assert sample(logits, [row(output=[1], ignore_eos=True, **params)]).token_ids == [EOS]


def test_min_tokens_mask_is_exact_for_sampled_rows():
    processed = apply_logits_processors(torch.zeros(1, 10), [row(min_tokens=1, stop_token_ids=[2])])
    assert torch.isinf(processed[0, [2, EOS]]).all()
    assert torch.isfinite(processed[0, [0, 1, 3, 4, 5, 6, 8, 9]]).all()


def seeded_tokens(seed: int, steps: int, batch_mates: int) -> list[int]:
    """A seeded request's tokens over `steps` steps, each step in a batch with other rows."""
    torch.manual_seed(100 + batch_mates)  # the batch mates' logits and draws differ per call
    target = row(seed=seed, temperature=0.8, top_p=0.95)
    tokens = []
    for step in range(steps):
        logits = torch.randn(batch_mates + 1, 500, generator=torch.Generator().manual_seed(step))
        logits[batch_mates] = torch.linspace(-2, 2, 500)  # the seeded row sees the same logits every run
        mates = [row(temperature=1.0), row(temperature=0.0), row(seed=7, top_k=10)] * batch_mates
        out = sample(logits, mates[:batch_mates] + [target])
        tokens.append(out.token_ids[-1])
        target.output_token_ids.append(tokens[-1])
    return tokens


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    alone = seeded_tokens(seed=42, steps=20, batch_mates=0)
    assert seeded_tokens(seed=42, steps=20, batch_mates=0) == alone
    assert seeded_tokens(seed=42, steps=20, batch_mates=5) == alone
    assert seeded_tokens(seed=43, steps=20, batch_mates=5) != alone


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_alternatives():
    torch.manual_seed(0)
    logits = torch.randn(3, 200)
    rows = [
        row(logprobs=5, temperature=0.7, top_k=20, repetition_penalty=1.5, prompt=[1, 2]),
        row(logprobs=0, temperature=0.0),
        row(temperature=1.0),
    ]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=1)
    for i, n in [(0, 5), (1, 0)]:
        lp = out.logprobs[i]
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert lp.rank == 1 + int((raw[i] > raw[i, token]).sum())
        values, ids = raw[i].topk(n)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[1].rank == 1  # greedy picks the best token
    assert out.logprobs[2] is None


def test_half_precision_logits_are_processed_in_float32():
    logits = torch.randn(2, 64).to(torch.bfloat16)
    processed = apply_logits_processors(logits, [row(temperature=0.5, top_p=0.9), row(temperature=0.0)])
    assert processed.dtype == torch.float32
    assert math.isclose(processed[0].softmax(dim=0).sum().item(), 1.0, rel_tol=1e-5)
    assert len(sample(logits, [row(), row(temperature=0.0)]).token_ids) == 2
