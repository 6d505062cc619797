"""Request: one sequence's state as it moves waiting -> running (-> preempted -> waiting) -> finished."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from fp4serve.multimodal.inputs import MultimodalPrompt
from fp4serve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the engine failed while processing this request (vLLM's FinishReason.ERROR)

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + output may not exceed this (max_model_len)
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV / state is in the caches
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chain over committed full blocks
    state_slot: int | None = None
    # Hybrid prefix caching: the GDN snapshot slot of this request's latest snapshot, held while it
    # runs, and its position (engine/scheduler.py _take_snapshots).
    held_snapshot: int | None = None
    held_position: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    num_preemptions: int = 0
    logprobs: list | None = None  # TokenLogprobs per output token when params.logprobs is set
    # params.prompt_logprobs set: per prompt position, the TokenLogprobs of that prompt token given
    # the ones before it (None at position 0, which has nothing before it), filled chunk by chunk.
    prompt_logprobs: list | None = None
    # Speculative decoding: tokens a proposer drafted to verify in the next step. They are not
    # output (yet): the verification step appends the accepted ones.
    draft_token_ids: list[int] = field(default_factory=list)
    # A prompt with images: where their tokens are, their M-RoPE positions; and per prompt block the
    # image digests its prefix-cache hash includes (so the same text with another image never hits).
    mm: MultimodalPrompt | None = None
    block_extra_keys: list[tuple[str, ...]] = field(default_factory=list)

    def __post_init__(self):
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_in(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the whole history."""
        prompt, output = self.prompt_token_ids, self.output_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return output[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + output[: end - len(prompt)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
