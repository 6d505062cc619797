"""The tensor names an architecture loads, from fp4serve's own model built on the meta device (no
memory, no weights): the same classes, fused-shard table and renames the loader uses, so the
names doctor expects are exactly the names fp4serve would ask for."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from fp4serve.config import ModelInfo
from fp4serve.formats.checkpoint import QuantConfig
from fp4serve.layers.linear import linear_methods
from fp4serve.models.quantization import LinearMethodChooser
from fp4serve.models.registry import model_class
from fp4serve.models.weights import checkpoint_name, expected_keys

FUSED_EXPERTS = re.compile(r"((?:.+\.)?experts)\.(gate_up_proj|down_proj)")


@dataclass
class Skeleton:
    expected: set[str]  # checkpoint names (after renames) the model needs, mtp.* included when built
    renames: list[tuple[str, str]]
    dropped: dict[str, str]  # fnmatch pattern -> why the loader skips it
    optional: set[str] = field(default_factory=set)  # accepted but not required (a tied lm_head)

    def canonical(self, name: str) -> str:
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def dropped_by(self, name: str) -> str | None:
        return next((p for p in self.dropped if fnmatch.fnmatchcase(name, p)), None)


def build_skeleton(info: ModelInfo, quant: QuantConfig | None, with_mtp: bool) -> Skeleton:
    """Raises UnsupportedModelError for an architecture fp4serve does not build, CheckpointError
    when the quantization lists split a fused group."""
    cls = model_class(info.architectures)
    chooser = LinearMethodChooser(quant, cls.stacked_params, cls.checkpoint_renames, "w4a16") if quant else None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"), linear_methods(chooser) if chooser else contextlib.nullcontext():
            model = cls(info.text_config, torch.bfloat16)
            head = None
            if with_mtp:
                from fp4serve.models.mtp import MultiTokenPredictor

                head = nn.Module()
                head.mtp = MultiTokenPredictor(info.text_config, torch.bfloat16, getattr(cls, "moe", False))
    finally:
        torch.set_default_dtype(previous)
    plan = model.load_plan()
    expected = {checkpoint_name(k, plan) for k in expected_keys(model)}
    optional = set()
    if info.text_config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        optional.add("lm_head.weight")
    if head is not None:
        expected |= {checkpoint_name(k, plan) for k in expected_keys(head)}
        plan.dropped.pop("mtp.*", None)
    return Skeleton(expected, plan.renames, plan.dropped, optional)


def expand_fused_experts(name: str, shape: tuple[int, ...]) -> list[str]:
    """transformers' fused 3-D expert tensors as the per-expert names the loader splits them into."""
    match = FUSED_EXPERTS.fullmatch(name)
    if match is None or len(shape) != 3:
        return [name]
    prefix, kind = match.groups()
    projections = ["down_proj"] if kind == "down_proj" else ["gate_proj", "up_proj"]
    return [f"{prefix}.{e}.{p}.weight" for e in range(shape[0]) for p in projections]
