"""--speculative-config: vLLM's JSON, validated at start so a wrong drafter fails before serving.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"method": "mtp", "num_speculative_tokens": 3}            # aliases qwen3_5_mtp, qwen3_next_mtp
    {"method": "dflash", "model": "path/to/drafter"}          # k defaults to block_size - 1
"model" is a directory or a hub id in the local Hugging Face cache ("revision": its snapshot, as vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fp4serve.errors import ConfigError, Fp4ServeError
from fp4serve.formats.safetensors_io import tensor_names
from fp4serve.model_path import resolve_model_dir

MTP_ALIASES = ("mtp", "qwen3_5_mtp", "qwen3_next_mtp")
METHODS = ("ngram", *MTP_ALIASES, "dflash")
# attention_backend: vLLM's drafter kernel choice; fp4serve has one attention path, and the engine
# logs so (vllm_compat.py).
_KEYS = {
    "method", "model", "revision", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
    "attention_backend",
}  # fmt: skip
# vLLM's default lookup window when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5


@dataclass
class SpeculativeConfig:
    method: str  # ngram | mtp | dflash (aliases resolved)
    num_speculative_tokens: int
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP
    model: Path | None = None  # the drafter directory (dflash) or the target's (mtp)


def parse_speculative_config(raw: dict | None, target_path: Path, target_config) -> SpeculativeConfig | None:
    """Validate `raw` (already JSON-decoded) against the target model; None when drafting is off."""
    if not raw:
        return None
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"--speculative-config: unknown keys {unknown}; known: {sorted(_KEYS)}")
    method = raw.get("method")
    if method not in METHODS:
        raise ConfigError(f"--speculative-config: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    k = raw.get("num_speculative_tokens")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ConfigError(f"--speculative-config: num_speculative_tokens must be an integer >= 1, got {k!r}")
    if method == "ngram":
        return _ngram(raw, k)
    if method in MTP_ALIASES:
        return _mtp(raw, k, target_path, target_config)
    return _dflash(raw, k, target_config)


def _ngram(raw: dict, k: int | None) -> SpeculativeConfig:
    if k is None:
        raise ConfigError("--speculative-config: method ngram needs num_speculative_tokens")
    low, high = raw.get("prompt_lookup_min"), raw.get("prompt_lookup_max")
    for name, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"--speculative-config: {name} must be an integer >= 1, got {value!r}")
    # vLLM: a missing bound takes the other's value; both missing: 5.
    low = low if low is not None else (high or DEFAULT_PROMPT_LOOKUP)
    high = high if high is not None else max(low, DEFAULT_PROMPT_LOOKUP)
    if low > high:
        raise ConfigError(f"--speculative-config: prompt_lookup_min {low} > prompt_lookup_max {high}")
    return SpeculativeConfig("ngram", k, low, high)


def _mtp(raw: dict, k: int | None, target_path: Path, target_config) -> SpeculativeConfig:
    path = _drafter_dir(raw, "MTP head") if raw.get("model") else target_path
    if not getattr(target_config, "mtp_num_hidden_layers", 0):
        raise ConfigError(
            f"--speculative-config: method {raw['method']!r} needs a Qwen3.5/3.6 target with an MTP head "
            f"(mtp_num_hidden_layers in its config); {target_path.name} has none"
        )
    if not any(name.startswith("mtp.") for name in tensor_names(path)):
        raise ConfigError(
            f"--speculative-config: method {raw['method']!r} needs the checkpoint's mtp.* tensors, and {path} has "
            f"none (some quantized exports drop them)"
        )
    return SpeculativeConfig("mtp", k or 1, model=path)


def _dflash(raw: dict, k: int | None, target_config) -> SpeculativeConfig:
    from fp4serve.models.dflash import check_drafter, draft_value

    if not raw.get("model"):
        raise ConfigError('--speculative-config: method dflash needs "model": the drafter\'s directory')
    path = _drafter_dir(raw, "DFlash drafter")
    try:
        drafter = check_drafter(path, target_config)
    except Fp4ServeError as e:
        raise ConfigError(f"--speculative-config: {e}") from e
    block_size = int(draft_value(drafter, "block_size", 16))
    if k is not None and k > block_size - 1:
        raise ConfigError(
            f"DFlash drafter {path}: num_speculative_tokens {k} exceeds block_size - 1 = {block_size - 1}"
        )
    return SpeculativeConfig("dflash", k or block_size - 1, model=path)


def _drafter_dir(raw: dict, what: str) -> Path:
    """The directory of raw["model"]: a local directory or a cached hub id (model_path.py)."""
    if not isinstance(raw["model"], str):
        raise ConfigError(f"--speculative-config: model must be a string (a directory or hub id), got {raw['model']!r}")
    revision = raw.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise ConfigError(f"--speculative-config: revision must be a string, got {revision!r}")
    try:
        return resolve_model_dir(raw["model"], revision, what)
    except ConfigError as e:
        raise ConfigError(f"--speculative-config: {e}") from e
