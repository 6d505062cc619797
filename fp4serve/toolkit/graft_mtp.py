"""`fp4serve graft-mtp DIR --from BASE`: put the 16-bit MTP head (`mtp.*`, docs/reference.md
section 5) of a base checkpoint into a quantized one that lost it.

The tensors are copied byte for byte into a new shard; the index (created if the target was one
file), `mtp_num_hidden_layers` and the ignore lists (so loaders keep the head in 16 bits, which is
what its tensors are) are updated to match."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fp4serve.errors import CheckpointError
from fp4serve.formats.checkpoint import QuantConfig
from fp4serve.formats.safetensors_file import write_tensors
from fp4serve.formats.safetensors_io import INDEX_NAME
from fp4serve.toolkit.checkpoint_dir import HF_QUANT_NAME, CheckpointDir, index_for, staged_rewrite
from fp4serve.toolkit.quant_lists import PREFIX_PATTERN, edit_ignore_lists, quant_method

MTP_SHARD = "model-mtp.safetensors"
# Text-config keys the head's shapes depend on: base and target must agree on each.
SHAPE_KEYS = ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")  # fmt: skip
QUANTIZED_PARAMS = ("weight_packed", "weight_scale", "weight_scale_2", "weight_global_scale", "input_scale")


@dataclass
class GraftReport:
    grafted: list[str]
    shard: str
    replaced: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"grafted {len(self.grafted)} mtp.* tensors into {self.shard}"]
        if self.replaced:
            out.append(f"replaced {len(self.replaced)} mtp.* tensors the checkpoint had (--force)")
        return out + self.changes


def text_config(config: dict) -> dict:
    return config.get("text_config") or config


def mtp_layer_count(names) -> int:
    layers = {int(m.group(1)) for n in names if (m := re.match(r"mtp\.layers\.(\d+)\.", n))}
    return max(layers) + 1 if layers else 0


def check_fits(base: CheckpointDir, target: CheckpointDir, names: list[str]) -> None:
    base_text, target_text = text_config(base.config()), text_config(target.config())
    for key in SHAPE_KEYS:
        if key in base_text and key in target_text and base_text[key] != target_text[key]:
            raise CheckpointError(
                f"{base.path} does not fit {target.path}: {key} is {base_text[key]} in the base and "
                f"{target_text[key]} in the target"
            )
    hidden = target_text.get("hidden_size")
    if "mtp.fc.weight" in names and hidden:
        shape = base.entry("mtp.fc.weight")[1].shape
        if shape != (hidden, 2 * hidden):
            raise CheckpointError(
                f"{base.path}: mtp.fc.weight is {list(shape)}, the target needs [{hidden}, {2 * hidden}]"
            )
    quantized = [
        n for n in names if n.rpartition(".")[2] in QUANTIZED_PARAMS or base.entry(n)[1].dtype in ("U8", "F8_E4M3")
    ]
    if quantized:
        raise CheckpointError(
            f"{base.path}: its MTP head is quantized ({quantized[0]}, ...); graft from the 16-bit checkpoint"
        )


def graft_mtp(
    target_dir: str | Path, base_dir: str | Path, out: str | Path | None = None, force: bool = False
) -> GraftReport:
    target, base = CheckpointDir.open(target_dir), CheckpointDir.open(base_dir)
    names = sorted(n for n in base.where if n.startswith("mtp."))
    if not names:
        raise CheckpointError(f"{base.path} has no mtp.* tensors: nothing to graft")
    check_fits(base, target, names)
    existing = sorted(n for n in target.where if n.startswith("mtp."))
    if existing and not force:
        files = sorted({target.where[n] for n in existing})
        raise CheckpointError(
            f"{target.path} already has {len(existing)} mtp.* tensors (in {', '.join(files)}); --force replaces them"
        )
    if MTP_SHARD in target.headers and any(n not in existing for n in target.headers[MTP_SHARD].tensors):
        raise CheckpointError(f"{target.path / MTP_SHARD} exists and holds other tensors; cannot write the head there")
    report = GraftReport(names, MTP_SHARD, replaced=existing)
    with staged_rewrite(target.path, out) as stage:
        headers = dict(target.headers)
        for file in sorted({target.where[n] for n in existing}):
            kept = [target.source(n) for n in headers.pop(file).tensors if not n.startswith("mtp.")]
            if kept:
                headers[file] = write_tensors(stage.file(file), kept, target.headers[file].metadata)
            else:
                stage.remove(file)
        headers[MTP_SHARD] = write_tensors(stage.file(MTP_SHARD), [base.source(n) for n in names])
        stage.write_json(INDEX_NAME, index_for(dict(sorted(headers.items())), target.index))
        if target.index is None:
            report.changes.append(f"created {INDEX_NAME} (the target was a single file)")
        config, hf_quant = target.config(), target.hf_quant()
        text = text_config(config)
        if not text.get("mtp_num_hidden_layers"):
            layers = text_config(base.config()).get("mtp_num_hidden_layers") or mtp_layer_count(names)
            text["mtp_num_hidden_layers"] = layers
            where = "text_config." if "text_config" in config else ""
            report.changes.append(f"config.json: {where}mtp_num_hidden_layers = {layers}")
        method = quant_method(config, hf_quant)
        if method in PREFIX_PATTERN:
            pattern = PREFIX_PATTERN[method]("mtp.")
            modules = {n.rpartition(".")[0] for n in names}

            def keep_mtp_16bit(entries: list[str]) -> list[str]:
                covered = QuantConfig(method, ignore=entries)
                return entries if all(covered.ignored_by(m) for m in modules) else [*entries, pattern]

            if edit_ignore_lists(config, hf_quant, keep_mtp_16bit):
                report.changes.append(f"quantization ignore lists: added {pattern!r} (the head stays 16-bit)")
                if hf_quant is not None:
                    stage.write_json(HF_QUANT_NAME, hf_quant)
        stage.write_json("config.json", config)
    return report
