"""A model directory as surgery sees it (its shards' headers and index), and the staged rewrite
every command makes: the new checkpoint is built in a hidden directory beside the destination and
swapped in by renames, so a failure at any point leaves the original untouched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fp4serve.errors import CheckpointError
from fp4serve.formats.safetensors_file import Header, SourceTensor, TensorEntry, read_header
from fp4serve.formats.safetensors_io import INDEX_NAME

HF_QUANT_NAME = "hf_quant_config.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


@dataclass
class CheckpointDir:
    """The safetensors shards of a directory (the index's, else every *.safetensors file)."""

    path: Path
    index: dict | None
    headers: dict[str, Header]  # file name -> header, in file-name order
    where: dict[str, str] = field(default_factory=dict)  # tensor name -> file name

    @classmethod
    def open(cls, path: str | Path) -> CheckpointDir:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a model directory (no config.json)")
        index = read_json(path / INDEX_NAME) if (path / INDEX_NAME).exists() else None
        if index is not None:
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{path / INDEX_NAME}: no weight_map")
            names = sorted(set(index["weight_map"].values()))
        else:
            names = sorted(p.name for p in path.glob("*.safetensors"))
        if not names:
            raise CheckpointError(f"no *.safetensors weights in {path}")
        headers = {}
        for name in names:
            if not (path / name).is_file():
                raise CheckpointError(f"{path / INDEX_NAME} lists {name}, which does not exist (run fp4serve doctor)")
            headers[name] = read_header(path / name)
        where = {}
        for file, header in headers.items():
            for tensor in header.tensors:
                if tensor in where:
                    raise CheckpointError(f"{tensor} is in both {where[tensor]} and {file}")
                where[tensor] = file
        return cls(path, index, headers, where)

    def entry(self, tensor: str) -> tuple[Header, TensorEntry]:
        header = self.headers[self.where[tensor]]
        return header, header.tensors[tensor]

    def source(self, tensor: str, new_name: str | None = None) -> SourceTensor:
        """The tensor as a byte range to copy, optionally under a new name."""
        header, entry = self.entry(tensor)
        return SourceTensor(new_name or tensor, entry, header)

    def config(self) -> dict:
        return read_json(self.path / "config.json")

    def hf_quant(self) -> dict | None:
        file = self.path / HF_QUANT_NAME
        return read_json(file) if file.exists() else None


def index_for(headers: dict[str, Header], previous: dict | None) -> dict:
    """model.safetensors.index.json for these shards, keeping the previous index's other metadata."""
    metadata = dict((previous or {}).get("metadata") or {})
    metadata["total_size"] = sum(t.nbytes for h in headers.values() for t in h.tensors.values())
    weight_map = {name: file for file, h in headers.items() for name in h.tensors}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


class Stage:
    """The directory a command writes its new and changed files into. Every file of the source it
    neither writes nor removes is carried over by hard link (a copy where links are impossible)."""

    def __init__(self, source: Path, staging: Path):
        self.source = source
        self.dir = staging
        self.removed: set[str] = set()

    def file(self, name: str) -> Path:
        return self.dir / name

    def write_json(self, name: str, data: dict) -> None:
        (self.dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def remove(self, name: str) -> None:
        self.removed.add(name)

    def carry_over(self) -> None:
        for item in sorted(self.source.iterdir()):
            if item.name in self.removed or (self.dir / item.name).exists():
                continue
            if item.is_dir():
                shutil.copytree(item, self.dir / item.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(item, self.dir / item.name)


def _link_or_copy(src, dst) -> None:
    """Symlinks are followed: the result holds real files (a link into a cache outside the model
    directory does not survive a container mount)."""
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def staged_rewrite(source: str | Path, out: str | Path | None = None) -> Iterator[Stage]:
    """Yield a Stage; on normal exit the staged directory replaces `source` (or becomes `out`)."""
    source = Path(source).resolve()
    dest = Path(out).resolve() if out else source
    if out and dest.exists():
        raise CheckpointError(f"{dest} already exists; choose a new --out directory")
    staging = dest.parent / f".{dest.name}.fp4serve-staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        stage = Stage(source, staging)
        yield stage
        stage.carry_over()
        if out:
            staging.rename(dest)
            return
        old = dest.parent / f".{dest.name}.fp4serve-old-{os.getpid()}"
        source.rename(old)
        try:
            staging.rename(dest)
        except BaseException:
            old.rename(source)
            raise
        shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
