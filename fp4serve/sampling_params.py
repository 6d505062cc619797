"""SamplingParams: the per-request knobs, shaped like vLLM's."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from fp4serve.errors import InvalidRequestError

# Fields a model's generation_config.json may set as defaults (vLLM `--generation-config auto`).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

MAX_INT32 = 2**31 - 1  # token ids and counts live in int32/int64 tensors; nothing real comes near this
# name: (low, high, low_open). OpenAI's and vLLM's documented ranges; where they document none
# (temperature, repetition_penalty above and below), a bound far past any useful value that keeps
# float32 logits finite: 1/temperature or a logit divided by the penalty must not overflow.
FLOAT_RANGES = {
    "temperature": (0.0, 100.0, False),
    "top_p": (0.0, 1.0, True),
    "min_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "repetition_penalty": (0.01, 100.0, False),
}
# name: (low, high), both inclusive. top_k: -1 (disabled) is 0 by the time validate runs.
INT_RANGES = {
    "n": (1, MAX_INT32),
    "top_k": (0, MAX_INT32),
    "max_tokens": (1, MAX_INT32),
    "min_tokens": (0, MAX_INT32),
    "seed": (-(2**63), 2**64 - 1),  # what torch.Generator takes
    "logprobs": (0, 20),
    "prompt_logprobs": (0, 20),
}
OPTIONAL_INTS = ("max_tokens", "seed", "logprobs", "prompt_logprobs")
BOOL_FIELDS = ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens")


def is_int(value) -> bool:
    """An int that is not a bool: True is an int in Python, never a token id or a count in a request."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, high: int) -> None:
    if not is_int(value) or not low <= value <= high:
        kind = "" if is_int(value) else " and an integer"
        raise InvalidRequestError(f"{name} must be in [{low}, {high}]{kind}, got {value!r}", name)


def _check_float(name: str, value, low: float, high: float, low_open: bool) -> None:
    number = is_int(value) or isinstance(value, float)
    in_range = number and (low < value if low_open else low <= value) and value <= high
    if not in_range:
        bracket = "(" if low_open else "["
        raise InvalidRequestError(f"{name} must be a finite number in {bracket}{low:g}, {high:g}], got {value!r}", name)


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
    # vLLM's prompt_logprobs: each prompt token's own logprob plus this many top alternatives
    # (None: off). Such a request computes every prompt position, so it takes no prefix-cache hit.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Called by the sampler as fn(output_token_ids, logits) on the request's [1, V] float32 logits,
    # which it may change in place (e.g. engine/grammar.py masks tokens a grammar does not allow).
    logits_processors: list | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):  # before they are iterated below
            if not isinstance(getattr(self, name), list | None):
                raise InvalidRequestError(f"{name} must be a list, got {getattr(self, name)!r}", name)
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field that is of the wrong type or out of
        range. Checks are written as "value in range" so that NaN, which fails every comparison, fails them."""
        for name, (low, high, low_open) in FLOAT_RANGES.items():
            _check_float(name, getattr(self, name), low, high, low_open)
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL_INTS:
                _check_int(name, value, low, high)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}", "min_tokens")
        for i, token_id in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", token_id, 0, MAX_INT32)
        if not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop must be a string or a list of strings", "stop")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be true or false, got {getattr(self, name)!r}", name)

    def child(self, index: int) -> SamplingParams:
        """The params of choice `index` of an n > 1 request, which runs as n engine requests (vLLM
        V1's parallel sampling): n = 1 and, when seeded, seed + index, so each choice differs and
        the whole answer repeats."""
        seed = None if self.seed is None else self.seed + index
        # replace() runs __post_init__, so a seed pushed past 2^64 - 1 is refused naming `seed`.
        # logits_processors are shared: a caller whose processors keep state gives each child its own.
        return replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @classmethod
    def from_defaults(cls, defaults: dict | None, **overrides) -> SamplingParams:
        """Request values win; the model's generation_config fills what the request left out."""
        names = {f.name for f in fields(cls)}
        merged = {k: v for k, v in (defaults or {}).items() if k in names}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**merged)
