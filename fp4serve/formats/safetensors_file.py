"""safetensors files at the byte level (docs/reference.md section 8): read a header, write a header,
write a file whose tensors are raw byte ranges copied from other files.

Nothing here decodes a tensor: surgery copies bytes, so a copied tensor is bit-identical by
construction, and a 20 GB shard is streamed in chunks, never held in memory."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fp4serve.errors import CheckpointError

HEADER_ALIGN = 8  # the data region starts on an 8-byte boundary (safetensors writes it so)
COPY_CHUNK = 64 << 20
METADATA = "__metadata__"
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: dtype string, shape, and its byte range in the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    header_len: int  # N: the JSON header's length in bytes, padding included
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)


def read_header(path: str | Path) -> Header:
    """Parse and check a file's header; CheckpointError names the file and the defect."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated safetensors file (header says {header_len} bytes, file has {size})"
            )
        raw = f.read(header_len)
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = parsed.pop(METADATA, None)
    tensors = {}
    for name, info in parsed.items():
        try:
            start, end = info["data_offsets"]
            entry = TensorEntry(name, info["dtype"], tuple(info["shape"]), int(start), int(end))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
        tensors[name] = entry
    header = Header(path, header_len, tensors, metadata)
    if header.data_start + header.data_size > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, tensors need {header.data_start + header.data_size})"
        )
    return header


def encode_header(tensors: list[TensorEntry], metadata: dict[str, str] | None, length: int | None = None) -> bytes:
    """The JSON header padded with spaces (the format allows trailing whitespace) so that the data
    region starts 8-byte aligned, or to exactly `length` bytes when given (same data position)."""
    body: dict = {METADATA: metadata} if metadata else {}
    for t in tensors:
        body[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
    raw = json.dumps(body, separators=(",", ":")).encode()
    if length is None:
        length = len(raw) + (-(8 + len(raw)) % HEADER_ALIGN)
    if len(raw) > length:
        raise ValueError(f"header needs {len(raw)} bytes, only {length} available")
    return raw + b" " * (length - len(raw))


def copy_range(src, dst, start: int, nbytes: int) -> None:
    """Copy nbytes of open file `src` from offset `start` to the current position of `dst`."""
    src.seek(start)
    while nbytes:
        chunk = src.read(min(COPY_CHUNK, nbytes))
        if not chunk:
            raise CheckpointError(f"{src.name}: ended early while copying tensor bytes")
        dst.write(chunk)
        nbytes -= len(chunk)


@dataclass(frozen=True)
class SourceTensor:
    """A tensor to write: its name in the new file and where its bytes are now."""

    name: str
    entry: TensorEntry
    header: Header


def write_tensors(path: str | Path, sources: list[SourceTensor], metadata: dict[str, str] | None = None) -> Header:
    """Write a new safetensors file holding `sources` in order, each one's bytes copied unchanged."""
    path = Path(path)
    entries, offset = [], 0
    for s in sources:
        entries.append(TensorEntry(s.name, s.entry.dtype, s.entry.shape, offset, offset + s.entry.nbytes))
        offset += s.entry.nbytes
    header = encode_header(entries, metadata if metadata is not None else {"format": "pt"})
    with contextlib.ExitStack() as files:
        opened: dict[Path, object] = {}
        out = files.enter_context(open(path, "wb"))
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for s in sources:
            if s.header.path not in opened:
                opened[s.header.path] = files.enter_context(open(s.header.path, "rb"))
            copy_range(opened[s.header.path], out, s.header.data_start + s.entry.start, s.entry.nbytes)
        out.flush()
        os.fsync(out.fileno())
    return read_header(path)
