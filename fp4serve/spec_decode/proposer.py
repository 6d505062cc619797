"""The Proposer interface, what a proposer sees of a step, and the factory.

After each step's commit the engine calls propose(requests, limits, committed, reserve) for the
requests whose next step is a decode (`limits[i]` drafts at most). Model drafters keep their own
KV for the target's committed tokens, read from `committed` (never the rejected drafts' rows), and
may ask for blocks ahead of the next step through `reserve`. Nothing here imports the engine: it
hands proposers exactly these objects."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fp4serve.forward_batch import ForwardBatch, StepCaptures
from fp4serve.spec_decode.config import SpeculativeConfig

# reserve(request, num_tokens) -> True once the request's blocks cover num_tokens positions;
# False, holding nothing new, when the pool has no blocks for it.
Reserve = Callable[[object, int], bool]


@dataclass
class CommittedStep:
    """The target's step just committed, as drafters read it."""

    batch: ForwardBatch  # what the target ran
    hidden: torch.Tensor  # [T, H] its final hidden states, every row
    captures: StepCaptures  # the layer outputs Proposer.capture_layers asked for
    # (request, its sequence index in batch, leading rows now committed) for each scheduled request
    # still running or finished this step: a prefill chunk's rows, or a verified request's last
    # token and accepted drafts. A finished request has released its blocks (request.block_ids is
    # empty); batch.block_ids still names them, and they are not reused before the next step.
    rows: list[tuple[object, int, int]]


class Proposer(ABC):
    # Target decoder layers whose outputs propose() reads from committed.captures.hidden.
    capture_layers: tuple[int, ...] = ()
    # How many tokens past a position the drafter's cache row there depends on (MTP's row t reads
    # token t + 1): a prefix-cache hit must match that many tokens beyond its end.
    cache_lookahead: int = 0

    def cache_layers(self) -> list[nn.Module]:
        """The drafter's attention layers: their KV shares the target's blocks and block tables."""
        return []

    def weight_modules(self) -> list[nn.Module]:
        """The drafter's own modules, whose weights the cache budget leaves room for."""
        return []

    @abstractmethod
    def propose(self, requests: list, limits: list[int], committed: CommittedStep, reserve: Reserve) -> list[list[int]]:
        """Up to limits[i] draft tokens for requests[i]."""


def make_proposer(config: SpeculativeConfig, target: nn.Module, calibrate_kv_scales: bool) -> Proposer:
    """target: the loaded target model (drafters share its embedding and lm_head).
    calibrate_kv_scales: a drafter with a quantized KV cache calibrates on its own first forward."""
    if config.method == "ngram":
        from fp4serve.spec_decode.ngram import NgramProposer

        return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "mtp":
        from fp4serve.spec_decode.mtp import MTPProposer

        return MTPProposer(Path(config.model), target, calibrate_kv_scales)
    from fp4serve.spec_decode.dflash import DFlashProposer

    return DFlashProposer(Path(config.model), target)
