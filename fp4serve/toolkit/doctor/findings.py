"""What a doctor rule reports, and what every rule reads: the checkpoint's files as far as they
could be read (a defective shard is reported once, by the files rules, and left out of the rest)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fp4serve.formats.safetensors_file import Header, TensorEntry

ERROR, WARNING = "error", "warning"
TARGETS = ("vllm", "fp4serve")


@dataclass(frozen=True)
class Finding:
    severity: str  # ERROR | WARNING
    rule: str  # stable id, e.g. "N01"
    message: str  # names the tensors or files
    fix: str  # what to do, often an fp4serve command

    def to_json(self) -> dict:
        return asdict(self)


def listing(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


@dataclass
class Context:
    path: Path
    targets: tuple[str, ...]
    check_values: bool = True
    config: dict | None = None
    hf_quant: dict | None = None
    headers: dict[str, Header] = field(default_factory=dict)  # the readable shards
    broken_files: set[str] = field(default_factory=set)  # shards the files rules found unreadable

    def severity(self, **by_target: str | None) -> str | None:
        """The worst severity over the targets asked for (None: the rule does not apply to them)."""
        found = [by_target.get(t) for t in self.targets]
        if ERROR in found:
            return ERROR
        return WARNING if WARNING in found else None

    @property
    def tensors(self) -> dict[str, tuple[Header, TensorEntry]]:
        return {name: (h, e) for h in self.headers.values() for name, e in h.tensors.items()}

    @property
    def text_config(self) -> dict:
        config = self.config or {}
        return config.get("text_config") or config

    def read_json(self, name: str) -> dict | None:
        file = self.path / name
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
