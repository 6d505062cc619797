"""Pick the proposer for a speculative config. Every proposer has one call,
propose(requests, limits, plan, step, num_accepted) -> drafts, run after each step's commit for the
requests whose next step is a decode (`limits[i]` drafts at most). Model drafters also get the step
(plan, the runner's StepOutput and each scheduled request's accepted count) to keep their caches:
they write entries for the step's committed tokens only (`committed_rows`)."""
from __future__ import annotations

from fp4serve.spec_decode.config import SpeculativeConfig
from fp4serve.spec_decode.ngram import NgramProposer


def make_proposer(config: SpeculativeConfig, engine):
    if config.method == "ngram":
        return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "mtp":
        from fp4serve.spec_decode.mtp import MTPProposer

        return MTPProposer(config, engine)
    from fp4serve.spec_decode.dflash import DFlashProposer

    return DFlashProposer(config, engine)


def committed_rows(plan, step, num_accepted: list[int]) -> list[tuple[int, int]]:
    """(index into plan.scheduled, number of leading rows) for every scheduled request still
    running after the commit: the rows of the batch whose tokens are now committed (a prefill
    chunk's rows, or a verified request's last token and accepted drafts). Rejected drafts' rows
    and finished requests (their blocks are already free) are left out."""
    out = []
    for i, item in enumerate(plan.scheduled):
        if item.request.status.finished:
            continue
        out.append((i, item.num_tokens - item.num_drafts + num_accepted[i]))
    return out
