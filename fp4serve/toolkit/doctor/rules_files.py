"""Files: config.json, Git LFS pointers, symlinks, truncated shards, index vs shards.

F00 config.json missing or invalid; F01 Git LFS pointer instead of content; F02 symlink that leaves
the model directory or dangles; F03 unreadable/truncated safetensors; F04 index names a missing
shard; F05 index names a tensor its shard lacks; F06 shard tensor missing from the index;
F07 index total_size wrong; F08 safetensors file the index ignores; F09 no weights at all."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fp4serve.errors import CheckpointError
from fp4serve.formats.safetensors_file import read_header
from fp4serve.formats.safetensors_io import INDEX_NAME
from fp4serve.toolkit.doctor.findings import ERROR, WARNING, Context, Finding, listing

LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
LFS_FIX = "fetch the real files: `git lfs pull` in the clone, or download again without GIT_LFS_SKIP_SMUDGE"


def is_lfs_pointer(path) -> bool:
    try:
        if path.stat().st_size > 1024:
            return False
        with open(path, "rb") as f:
            return f.read(len(LFS_MAGIC)) == LFS_MAGIC
    except OSError:
        return False


def check(ctx: Context) -> Iterator[Finding]:
    root = ctx.path.resolve()
    pointers = set()
    for item in sorted(ctx.path.rglob("*")):
        rel = str(item.relative_to(ctx.path))
        if item.is_symlink():
            target = item.resolve()
            if not target.exists():
                yield Finding(
                    ERROR,
                    "F02",
                    f"{rel} is a symlink to {target}, which does not exist",
                    "replace it with the file itself",
                )
                continue
            if not target.is_relative_to(root):
                yield Finding(
                    ERROR, "F02",
                    f"{rel} is a symlink to {target}, outside the model directory: a container that mounts only "
                    "the model directory cannot follow it",
                    "copy the real files in (`cp -L`, or download with --local-dir and no symlinks); any fp4serve "
                    "surgery command also writes real files",
                )  # fmt: skip
        if item.is_file() and is_lfs_pointer(item):
            pointers.add(rel)
    if pointers:
        yield Finding(ERROR, "F01", f"Git LFS pointer files instead of content: {listing(pointers)}", LFS_FIX)

    config_file = ctx.path / "config.json"
    try:
        ctx.config = json.loads(config_file.read_text())
    except FileNotFoundError:
        yield Finding(ERROR, "F00", f"{ctx.path} has no config.json", "copy config.json from the source checkpoint")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if "config.json" not in pointers:
            yield Finding(
                ERROR, "F00", f"config.json is not valid JSON ({e})", "restore config.json from the source checkpoint"
            )
    ctx.hf_quant = ctx.read_json("hf_quant_config.json")

    index = None
    if (ctx.path / INDEX_NAME).exists() and INDEX_NAME not in pointers:
        index = ctx.read_json(INDEX_NAME)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            yield Finding(ERROR, "F04", f"{INDEX_NAME} is not a valid index (no weight_map)", "rebuild the index")
            index = None
    on_disk = sorted(p.name for p in ctx.path.glob("*.safetensors"))
    shards = sorted(set(index["weight_map"].values())) if index else on_disk
    if not shards:
        yield Finding(ERROR, "F09", f"no safetensors weights in {ctx.path}", "download the *.safetensors files")
        return
    for name in shards:
        file = ctx.path / name
        if name in pointers:
            ctx.broken_files.add(name)
            continue
        if not file.exists():
            ctx.broken_files.add(name)
            yield Finding(
                ERROR, "F04", f"{INDEX_NAME} lists {name}, which does not exist", "download the missing shard"
            )
            continue
        try:
            ctx.headers[name] = read_header(file)
        except CheckpointError as e:
            ctx.broken_files.add(name)
            yield Finding(ERROR, "F03", str(e), f"download {name} again (compare its size with the source)")
    if index:
        yield from _index_findings(ctx, index, on_disk)


def _index_findings(ctx: Context, index: dict, on_disk: list[str]) -> Iterator[Finding]:
    weight_map = index["weight_map"]
    absent = [t for t, f in weight_map.items() if f in ctx.headers and t not in ctx.headers[f].tensors]
    if absent:
        yield Finding(
            ERROR, "F05", f"{INDEX_NAME} maps {len(absent)} tensors to shards that do not hold them: {listing(absent)}",
            "rebuild the index from the shards (or restore the shards the index was written for)",
        )  # fmt: skip
    unlisted = [t for f, h in ctx.headers.items() for t in h.tensors if weight_map.get(t) != f]
    if unlisted:
        yield Finding(
            WARNING, "F06",
            f"{len(unlisted)} tensors are in a shard but not mapped to it by {INDEX_NAME}: {listing(unlisted)} "
            "(loaders that follow the weight map miss them)",
            "rebuild the index from the shards",
        )  # fmt: skip
    if not ctx.broken_files:
        actual = sum(t.nbytes for h in ctx.headers.values() for t in h.tensors.values())
        declared = (index.get("metadata") or {}).get("total_size")
        if declared is not None and declared != actual:
            yield Finding(
                WARNING, "F07", f"{INDEX_NAME} metadata.total_size is {declared}, the tensors hold {actual} bytes",
                f"set metadata.total_size to {actual}",
            )  # fmt: skip
    ignored = [f for f in on_disk if f not in set(weight_map.values())]
    if ignored:
        yield Finding(
            WARNING, "F08", f"safetensors files not in {INDEX_NAME}, which loaders skip: {listing(ignored)}",
            "delete them, or add their tensors to the index",
        )  # fmt: skip
