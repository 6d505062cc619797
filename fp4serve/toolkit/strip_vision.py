"""`fp4serve strip-vision DIR`: remove the vision tower, keep a text model both fp4serve and vLLM load.

Removed: tensors under `model.visual.` and the mis-nested `model.language_model.visual.`, and the
ignore entries that only named them. Kept on purpose (docs/toolkit.md): the architecture
(`*ForConditionalGeneration`, whose text weights live under `model.language_model.`), `vision_config`
(the class is built from it) and the preprocessor configs; config.json gains
`language_model_only: true` to say so, and vLLM is served with `--language-model-only`, which
builds no vision tower and so expects none of its weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fp4serve.formats.checkpoint import QuantConfig
from fp4serve.formats.safetensors_file import write_tensors
from fp4serve.formats.safetensors_io import INDEX_NAME
from fp4serve.toolkit.checkpoint_dir import HF_QUANT_NAME, CheckpointDir, index_for, staged_rewrite
from fp4serve.toolkit.quant_lists import edit_ignore_lists, quant_method

VISION_PREFIXES = ("model.visual.", "model.language_model.visual.")


@dataclass
class StripReport:
    removed: list[str]
    changes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if not self.removed:
            return ["no vision tensors (model.visual.*, model.language_model.visual.*): nothing changed"]
        return [f"removed {len(self.removed)} vision tensors", *self.changes]


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def strip_vision(model_dir: str | Path, out: str | Path | None = None) -> StripReport:
    ckpt = CheckpointDir.open(model_dir)
    removed = sorted(n for n in ckpt.where if is_vision(n))
    report = StripReport(removed)
    if not removed:
        return report
    with staged_rewrite(ckpt.path, out) as stage:
        headers = dict(ckpt.headers)
        for file in sorted({ckpt.where[n] for n in removed}):
            kept = [ckpt.source(n) for n in headers.pop(file).tensors if not is_vision(n)]
            if kept:
                headers[file] = write_tensors(stage.file(file), kept, ckpt.headers[file].metadata)
                report.changes.append(f"{file}: rewritten with its {len(kept)} other tensors (bytes unchanged)")
            else:
                stage.remove(file)
                report.changes.append(f"{file}: held only vision tensors, removed")
        if ckpt.index is not None:
            stage.write_json(INDEX_NAME, index_for(headers, ckpt.index))
        config, hf_quant = ckpt.config(), ckpt.hf_quant()
        if any(a.endswith("ForConditionalGeneration") for a in config.get("architectures") or []):
            config["language_model_only"] = True
            report.changes.append("config.json: language_model_only = true (serve vLLM with --language-model-only)")
        method = quant_method(config, hf_quant)
        if method:
            dropped_modules = {n.rpartition(".")[0] for n in removed}
            kept_modules = {n.rpartition(".")[0] for n in ckpt.where if not is_vision(n)}
            quant = QuantConfig(method)
            names_only_vision: list[str] = []

            def drop_vision_entries(entries: list[str]) -> list[str]:
                def only_vision(entry: str) -> bool:
                    return any(quant.matches(m, entry) for m in dropped_modules) and not any(
                        quant.matches(m, entry) for m in kept_modules
                    )

                gone = [e for e in entries if only_vision(e)]
                names_only_vision.extend(e for e in gone if e not in names_only_vision)
                return [e for e in entries if e not in gone]

            if edit_ignore_lists(config, hf_quant, drop_vision_entries):
                report.changes.append(f"quantization ignore lists: removed {len(names_only_vision)} vision entries")
                if hf_quant is not None:
                    stage.write_json(HF_QUANT_NAME, hf_quant)
        stage.write_json("config.json", config)
    return report
