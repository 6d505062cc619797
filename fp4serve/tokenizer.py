"""Tokenizer, chat template and generation defaults of a model directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from fp4serve.errors import ConfigError, InvalidRequestError
from fp4serve.sampling_params import GENERATION_CONFIG_FIELDS

log = logging.getLogger(__name__)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class NoTokenizer:
    """Stands in for the tokenizer of a model served without one (vLLM's skip_tokenizer_init):
    prompts must be token ids, outputs carry token ids and empty text."""

    eos_token_id = None

    def __init__(self, why: str):
        self.why = why

    def _refuse(self, what: str):
        raise InvalidRequestError(
            f"{what} needs a tokenizer, and this server has none ({self.why}): send prompts as token ids "
            f"(prompt_token_ids, or a list of ints as the completions prompt), or restart with --tokenizer DIR"
        )

    def __call__(self, text, *args, **kwargs):
        self._refuse("a text prompt")

    @property
    def chat_template(self):
        self._refuse("a chat conversation")

    def convert_ids_to_tokens(self, ids):
        self._refuse("token strings")

    def decode(self, ids, *args, **kwargs) -> str:
        return ""

    def get_vocab(self) -> dict[str, int]:
        return {}  # no token strings known (ids still index the model's vocabulary)


def load_tokenizer(path: str | Path, chat_template: str | None = None, skip: bool = False, explicit: bool = False):
    """transformers' tokenizer; `chat_template` (a file or the template text) overrides the model's.
    skip (--skip-tokenizer-init), or a model directory without tokenizer files (`explicit`: the
    path came from --tokenizer, whose absence is an error), gives a NoTokenizer."""
    from transformers import AutoTokenizer

    if skip:
        return NoTokenizer("--skip-tokenizer-init")
    path = Path(path)
    if not explicit and path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files: serving token-id prompts only (pass --tokenizer DIR for text)", path)
        return NoTokenizer(f"{path} has no tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {path}: {e}") from e
    if chat_template is not None:
        template_path = Path(chat_template)
        tokenizer.chat_template = template_path.read_text() if template_path.exists() else chat_template
    return tokenizer


def read_generation_config(path: str | Path) -> dict:
    """generation_config.json as a dict ({} when absent)."""
    file = Path(path) / "generation_config.json"
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: {e}") from e


def sampling_defaults(generation_config: dict) -> dict:
    """The request defaults a model ships (vLLM --generation-config auto). A config that says
    do_sample=false asks for greedy decoding."""
    defaults = {k: generation_config[k] for k in GENERATION_CONFIG_FIELDS if k in generation_config}
    if generation_config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def eos_token_ids(tokenizer, generation_config: dict) -> frozenset[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = generation_config.get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return frozenset(ids)


def chat_prompt_ids(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
    tools: list[dict] | None = None,
) -> list[int]:  # fmt: skip
    """Render a conversation with the model's chat template and tokenize it, as vLLM does: the
    template writes the special tokens itself, so none are added on top."""
    import jinja2

    if tokenizer.chat_template is None:
        raise InvalidRequestError("this model has no chat template; pass --chat-template")
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )  # fmt: skip
    except jinja2.TemplateError as e:  # e.g. a template that insists on alternating roles
        raise InvalidRequestError(f"the chat template rejected the messages: {e}") from e
    return tokenizer(text, add_special_tokens=False).input_ids
