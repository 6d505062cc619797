"""Logprobs in the wire formats: the legacy completions format, and vLLM's prompt_logprobs."""

from __future__ import annotations

from fp4serve.sample.sampler import TokenLogprobs
from fp4serve.server.protocol import CompletionLogProbs, PromptLogprob


def legacy_logprobs(tokenizer, pairs: list[tuple[int, TokenLogprobs | None]], text_offset: int) -> CompletionLogProbs:
    """The legacy completions format: per (token id, logprobs) its text, logprob, offset and a
    {text: logprob} map of the alternatives, which always includes the token itself (as OpenAI
    documents). An echoed prompt's first token has no logprob: None, and no map."""
    result = CompletionLogProbs()
    for token_id, entry in pairs:
        token = tokenizer.decode([token_id])
        top = None
        if entry is not None:
            top = {tokenizer.decode([alternative]): logprob for alternative, logprob in entry.top}
            top[token] = entry.logprob
        result.tokens.append(token)
        result.token_logprobs.append(entry.logprob if entry is not None else None)
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def prompt_logprobs_json(tokenizer, prompt_ids: list[int], entries: list) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's prompt_logprobs: per prompt position None (the first) or {token id: Logprob} of the
    prompt token itself, then the top alternatives (ranks 1..k)."""
    result: list[dict[int, PromptLogprob] | None] = []
    for token_id, entry in zip(prompt_ids, entries):
        if entry is None:
            result.append(None)
            continue
        ranked = [(token_id, entry.logprob, entry.rank)] + [(t, lp, r) for r, (t, lp) in enumerate(entry.top, 1)]
        result.append(
            {t: PromptLogprob(logprob=lp, rank=r, decoded_token=tokenizer.decode([t])) for t, lp, r in ranked}
        )
    return result
