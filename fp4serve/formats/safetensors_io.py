"""Read a model directory's safetensors weights: one file, or shards listed in an index."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from fp4serve.errors import CheckpointError
from fp4serve.formats.safetensors_file import read_header

INDEX_NAME = "model.safetensors.index.json"


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a directory, checked to exist. The index wins when present."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {model_dir}")
    return files


def tensor_names(model_dir: str | Path) -> list[str]:
    """Tensor names of a checkpoint from the safetensors headers alone (no weights read)."""
    names = []
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            names += list(f.keys())
    return names


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every weight file, one file open at a time."""
    for path in weight_files(model_dir):
        # safetensors memory-maps lazily, so a truncated file would only fail (or read garbage) at
        # first touch: read_header compares the header's data extent with the file size up front.
        read_header(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types; name the file
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
