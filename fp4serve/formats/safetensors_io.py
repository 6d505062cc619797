"""Read a model directory's safetensors weights: one file, or shards listed in an index."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from fp4serve.errors import CheckpointError

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


def _check_complete(path: Path) -> None:
    """safetensors memory-maps lazily, so a truncated file would only fail (or read garbage) at
    first touch; compare the header's data extent with the file size up front."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + header_len + end})"
        )


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every weight file, one file open at a time."""
    for path in weight_files(model_dir):
        _check_complete(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types; name the file
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
