"""`fp4serve rename-tensors DIR --from PREFIX --to PREFIX`: rename tensors by prefix, editing only the
safetensors headers: every tensor's bytes and data offsets stay as they are.

A header that gets no longer is padded with spaces to its old length, so the data region does not
move and the file keeps its size; one that must grow moves the data region (the file is rewritten
and the report says so). Exact-name ignore entries under the prefix are renamed with the tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fp4serve.errors import CheckpointError
from fp4serve.formats.safetensors_file import TensorEntry, copy_range, encode_header, read_header
from fp4serve.formats.safetensors_io import INDEX_NAME
from fp4serve.toolkit.checkpoint_dir import HF_QUANT_NAME, CheckpointDir, index_for, staged_rewrite
from fp4serve.toolkit.quant_lists import edit_ignore_lists


@dataclass
class RenameReport:
    renames: dict[str, str]
    dry_run: bool
    changes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.dry_run:
            return [f"{old} -> {new}" for old, new in self.renames.items()] + [
                f"{len(self.renames)} tensors would be renamed (dry run: nothing changed)"
            ]
        return [f"renamed {len(self.renames)} tensors", *self.changes]


def planned_renames(ckpt: CheckpointDir, old: str, new: str) -> dict[str, str]:
    renames = {n: new + n[len(old) :] for n in sorted(ckpt.where) if n.startswith(old)}
    if not renames:
        raise CheckpointError(f"no tensor name in {ckpt.path} starts with {old!r}")
    staying = set(ckpt.where) - set(renames)
    collisions = sorted(v for v in renames.values() if v in staying)
    if collisions:
        raise CheckpointError(
            f"renaming {old!r} -> {new!r} would collide with {len(collisions)} existing tensors: "
            f"{', '.join(collisions[:5])}{', ...' if len(collisions) > 5 else ''}"
        )
    return renames


def rename_tensors(
    model_dir: str | Path, old: str, new: str, out: str | Path | None = None, dry_run: bool = False
) -> RenameReport:
    if not old:
        raise CheckpointError("--from must be a non-empty prefix")
    ckpt = CheckpointDir.open(model_dir)
    renames = planned_renames(ckpt, old, new)
    report = RenameReport(renames, dry_run)
    if dry_run:
        return report
    with staged_rewrite(ckpt.path, out) as stage:
        headers = dict(ckpt.headers)
        for file in sorted({ckpt.where[n] for n in renames}):
            headers[file] = rewrite_header(ckpt.headers[file], renames, stage.file(file), report)
        if ckpt.index is not None:
            stage.write_json(INDEX_NAME, index_for(headers, ckpt.index))
        config, hf_quant = ckpt.config(), ckpt.hf_quant()

        def rename_entries(entries: list[str]) -> list[str]:
            return [new + e[len(old) :] if e.startswith(old) else e for e in entries]

        if edit_ignore_lists(config, hf_quant, rename_entries):
            report.changes.append("quantization ignore lists: renamed the entries under the prefix")
            stage.write_json("config.json", config)
            if hf_quant is not None:
                stage.write_json(HF_QUANT_NAME, hf_quant)
    return report


def rewrite_header(header, renames: dict[str, str], dest: Path, report: RenameReport):
    entries = [
        TensorEntry(renames.get(t.name, t.name), t.dtype, t.shape, t.start, t.end) for t in header.tensors.values()
    ]
    try:
        raw = encode_header(entries, header.metadata, length=header.header_len)
        how = f"{dest.name}: header edited, padded to its old {header.header_len} bytes (data region unchanged)"
    except ValueError:
        raw = encode_header(entries, header.metadata)
        how = (
            f"{dest.name}: header grew from {header.header_len} to {len(raw)} bytes, so the file was rewritten "
            "(tensor bytes and offsets within the data region unchanged)"
        )
    with open(header.path, "rb") as src, open(dest, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        copy_range(src, out, header.data_start, header.data_size)
    report.changes.append(how)
    return read_header(dest)
