"""Pick the proposer for a speculative config. Every proposer has one call,
propose(requests, limits, plan, step) -> drafts, run after each step's commit for the requests
whose next step is a decode; plan and step (the runner's output) carry what model drafters need."""
from __future__ import annotations

from fp4serve.errors import UnsupportedModelError
from fp4serve.spec.config import SpeculativeConfig
from fp4serve.spec.ngram import NgramProposer


def make_proposer(config: SpeculativeConfig, engine):
    if config.method == "ngram":
        return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    raise UnsupportedModelError(f"speculative method {config.method!r} is not available yet")
