"""What generate() returns and the server streams; shaped like vLLM's RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field

from fp4serve.sample.sampler import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # "stop", "length", "abort", "error" (the engine failed on it)
    stop_reason: int | str | None = None  # the stop token id or stop string, None for EOS

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # What this step added, for streaming: text and tokens new since the previous RequestOutput.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprobs] | None = None
    # SamplingParams.prompt_logprobs set: one entry per prompt token, the first None (vLLM's shape;
    # complete from the first output on, since a request samples only after its whole prompt).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
