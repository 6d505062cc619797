"""--max-model-len as vLLM reads it: human-readable values (32k, 1M), -1 or auto, and the refusal of
a length beyond the model's positions unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (docs/serving.md)."""

from __future__ import annotations

import logging
import os
import re

from fp4serve.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = -1  # vLLM's value for "the model's length, or the longest the KV cache can hold"
ALLOW_LONG_ENV = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"
# vLLM: a lower-case suffix is decimal, an upper-case one binary (1k = 1000, 1K = 1024).
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_max_model_len(value: int | str | None) -> int | None:
    """None (the model's), AUTO, or a length >= 1 from an int or text such as '32768', '32k',
    '25.6k', '128K' (binary suffixes take whole numbers only, as vLLM)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"--max-model-len {value!r}: give a number of tokens")
    if isinstance(value, int):
        length = value
    else:
        text = str(value).strip()
        if text == "-1" or text.lower() == "auto":
            return AUTO
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", text)
        if match and match.group(2) in _DECIMAL:
            length = int(float(match.group(1)) * _DECIMAL[match.group(2)])
        elif match:
            number, suffix = match.groups()
            if "." in number:
                raise ConfigError(
                    f"--max-model-len {text}: decimals are not allowed with binary suffixes like {suffix}; "
                    f"did you mean {number}{suffix.lower()}?"
                )
            length = int(number) * _BINARY[suffix]
        elif re.fullmatch(r"[+-]?\d+", text):
            length = int(text)
        else:
            raise ConfigError(
                f"--max-model-len {text!r}: give a number of tokens (32768, 32k = 32000, 32K = 32768), or -1 / auto"
            )
    if length == AUTO:
        return AUTO
    if length < 1:
        raise ConfigError(f"--max-model-len {length}: give a length >= 1, or -1 / auto")
    return length


def derived_max_model_len(text_config) -> int:
    """The model's own context length: max_position_embeddings of its config."""
    return int(text_config.max_position_embeddings)


def check_max_model_len(requested: int | None, text_config) -> int:
    """The engine's max_model_len for a parsed --max-model-len (None and AUTO start from the
    model's length; the engine may lower AUTO to what the KV cache holds). A length beyond the
    model's positions is refused as vLLM refuses it, unless VLLM_ALLOW_LONG_MAX_MODEL_LEN is set."""
    derived = derived_max_model_len(text_config)
    if requested is None or requested == AUTO:
        return derived
    if requested <= derived:
        return requested
    # vLLM also accepts a length up to the config's model_max_length, where a model declares one.
    model_max_length = getattr(text_config, "model_max_length", None)
    if model_max_length is not None and requested <= model_max_length:
        return requested
    message = (
        f"User-specified max_model_len ({requested}) is greater than the derived max_model_len "
        f"(max_position_embeddings={derived} or model_max_length={model_max_length} in model's config.json)."
    )
    caution = (
        f"{ALLOW_LONG_ENV} must be used with extreme caution. If the model uses relative position encoding "
        "(RoPE), positions exceeding derived_max_model_len lead to nan. If the model uses absolute position "
        "encoding, positions exceeding derived_max_model_len will cause a CUDA array out-of-bounds error."
    )
    if os.environ.get(ALLOW_LONG_ENV, "0").strip().lower() in ("1", "true"):
        log.warning("%s %s", message, caution)
        return requested
    raise ConfigError(f"{message} To allow overriding this maximum, set the env var {ALLOW_LONG_ENV}=1. {caution}")
