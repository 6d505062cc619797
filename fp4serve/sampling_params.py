"""SamplingParams: the per-request knobs, shaped like vLLM's."""
from __future__ import annotations

from dataclasses import dataclass, fields

from fp4serve.errors import InvalidRequestError

# Fields a model's generation_config.json may set as defaults (vLLM `--generation-config auto`).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives returned with each sampled token
    skip_special_tokens: bool = True
    # Called by the sampler as fn(output_token_ids, logits) on the request's [1, V] float32 logits,
    # which it may change in place (e.g. engine/grammar.py masks tokens a grammar does not allow).
    logits_processors: list | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise InvalidRequestError(msg)

        if self.n != 1:
            bad(f"n={self.n} is not supported; send n separate requests")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be -1 (disable) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator takes
            bad(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be in [0, 20], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @classmethod
    def from_defaults(cls, defaults: dict | None, **overrides) -> "SamplingParams":
        """Request values win; the model's generation_config fills what the request left out."""
        names = {f.name for f in fields(cls)}
        merged = {k: v for k, v in (defaults or {}).items() if k in names}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**merged)
