"""Verification of drafts against the plain sampler: greedy acceptance equals step-by-step sampling
(penalties included), planted drafts are accepted for exactly their correct prefix, and with
temperature the emitted token is distributed as the target's, however bad the drafter (chi-square)."""
from __future__ import annotations

import pytest
import torch
from test_sampler import chi_square_p_value, row

from fp4serve.sample.sampler import apply_logits_processors, sample
from fp4serve.sample.verify import verify

V = 32


def _logits(k: int, seed: int) -> torch.Tensor:
    return torch.randn(k + 1, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("wrong_at", [0, 1, 3, None])
def test_planted_greedy_drafts_accept_exactly_the_correct_prefix(wrong_at):
    k = 4
    logits = _logits(k, 0)
    target = logits.argmax(dim=1).tolist()
    drafts = target[:k]
    if wrong_at is not None:
        drafts[wrong_at] = (drafts[wrong_at] + 1) % V
    out = verify(logits, [row(temperature=0)], [drafts])
    accepted = k if wrong_at is None else wrong_at
    assert out.num_accepted == [accepted]
    # the accepted drafts, then the target's own token at the first mismatch (or the bonus token)
    assert out.token_ids == [target[: accepted + 1]]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_verification_equals_sampling_one_token_at_a_time(seed):
    """Each row is processed as the plain sampler would process that position: penalties see the
    drafts before it as output, min_tokens masks EOS, so the result equals sequential sampling."""
    gen = torch.Generator().manual_seed(seed)
    k = 5
    logits = _logits(k, seed)
    params = dict(temperature=0, repetition_penalty=1.8, frequency_penalty=0.9, presence_penalty=0.6, min_tokens=3)
    prompt, output = torch.randint(V, (6,), generator=gen).tolist(), torch.randint(V, (1,), generator=gen).tolist()
    # drafts: mostly the processed argmax, so long runs are accepted and penalties matter along them
    drafts, expected = [], None
    for j in range(k):
        t = sample(logits[j : j + 1], [row(prompt, output + drafts, eos=(7,), **params)]).token_ids[0]
        if expected is None and torch.rand(1, generator=gen) < 0.25:
            expected = drafts + [t]
            t = (t + 3) % V
        drafts.append(t)
    if expected is None:
        expected = drafts + sample(logits[k:], [row(prompt, output + drafts, eos=(7,), **params)]).token_ids
    out = verify(logits, [row(prompt, output, eos=(7,), **params)], [drafts])
    assert out.token_ids == [expected]


def test_mixed_batch_and_logprobs():
    """Requests with and without drafts in one call; logprobs are the raw ones of each emitted token."""
    logits = torch.cat([_logits(2, 1), _logits(0, 2), _logits(3, 3)])
    t0, t2 = logits[:3].argmax(1).tolist(), logits[4:].argmax(1).tolist()
    rows = [row(temperature=0, logprobs=2), row(temperature=0), row(temperature=0, logprobs=0)]
    out = verify(logits, rows, [t0[:2], [], [t2[0], (t2[1] + 1) % V, t2[2]]])
    assert out.token_ids == [t0, [int(logits[3].argmax())], t2[:2]]
    assert out.num_accepted == [2, 0, 1]
    raw = logits.log_softmax(dim=1)
    assert [lp.token_id for lp in out.logprobs[0]] == t0 and out.logprobs[1] is None
    assert [lp.logprob for lp in out.logprobs[2]] == pytest.approx([float(raw[4, t2[0]]), float(raw[5, t2[1]])])
    assert all(len(lp.top) == 2 for lp in out.logprobs[0])


def _first_token_counts(logits, drafts, params, n, draft_probs=None):
    """Emitted first tokens of n seeded requests verifying the same drafts (drafts[i] per request
    when a list of lists); also the fraction of drafts accepted."""
    per_request = drafts if isinstance(drafts[0], list) else [drafts] * n
    rows = [row(seed=i, eos=(), **params) for i in range(n)]
    out = verify(logits.repeat(n, 1), rows, per_request, [draft_probs] * n if draft_probs is not None else None)
    counts = torch.bincount(torch.tensor([tokens[0] for tokens in out.token_ids]), minlength=V).float()
    return counts, sum(out.num_accepted) / sum(len(d) for d in per_request)


@pytest.mark.parametrize(
    "params, bad_draft",
    [
        ({"temperature": 0.8}, "unlikely"),  # rarely accepted: the residual draw carries the mass
        ({"temperature": 1.3, "top_k": 6}, "likely"),  # often accepted
        ({"temperature": 1.0, "top_p": 0.8, "repetition_penalty": 1.5}, "outside"),  # outside the support: never
    ],
)
def test_sampled_first_token_has_the_target_distribution(params, bad_draft):
    k = 3
    logits = _logits(k, 5)
    target = apply_logits_processors(logits[:1], [row(eos=(), **params)]).softmax(dim=1)[0]
    order = target.argsort(descending=True).tolist()
    first = {"likely": order[0], "unlikely": order[4], "outside": order[-1]}[bad_draft]
    counts, acceptance = _first_token_counts(logits, [first, order[1], order[2]], params, n=3000)
    assert chi_square_p_value(counts, target) > 1e-3
    assert (counts[target == 0] == 0).all()  # nothing outside the target's support, ever
    if bad_draft == "outside":
        assert acceptance == 0


def test_sampled_with_a_drafter_distribution():
    """General q (a sampling drafter): drafts drawn from q, accepted with min(1, p/q), residual
    normalize(max(p - q, 0)); q is far from p, so most of the mass comes from the residual."""
    k, n = 2, 3000
    logits = _logits(k, 9)
    target = logits[:1].softmax(dim=1)[0]
    q = torch.softmax(torch.randn(k, V, generator=torch.Generator().manual_seed(4)) * 2, dim=1)
    drafts = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(5)).T.tolist()
    counts, acceptance = _first_token_counts(logits, drafts, {"temperature": 1.0}, n=n, draft_probs=q)
    assert chi_square_p_value(counts, target) > 1e-3
    assert 0.05 < acceptance < 0.95
