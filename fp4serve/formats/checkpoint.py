"""What kind of weights a model directory holds: plain, ModelOpt NVFP4 or compressed-tensors NVFP4.

Reads `hf_quant_config.json` and config.json's `quantization_config` (docs/reference.md section 2) into one
`QuantConfig`, and answers per Linear whether it is quantized. Which modules stay unquantized is
decided by the layout's own list: ModelOpt's `exclude_modules`/`ignore` (fnmatch wildcards) or
compressed-tensors' `ignore`/`targets` (exact names or `re:` regexes; `Linear` targets every Linear).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fp4serve.errors import ConfigError, UnsupportedModelError

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
ON_THE_FLY = "nvfp4"

MODELOPT_NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4", "NVFP4_AWQ")

# Modules `--quantization nvfp4` keeps in 16 bits: ModelOpt's NVFP4_DEFAULT_CFG exclusions
# (docs/reference.md section 2), written as patterns over module names.
DEFAULT_EXCLUDES = [
    "*lm_head",
    "*proj_out",
    "*block_sparse_moe.gate",
    "*router*",
    "*mlp.gate",
    "*mlp.shared_expert_gate",
    "*conv1d",
    "*output_layer*",
    "output",
    "*linear_attn.in_proj_a",
    "*linear_attn.in_proj_b",
    "mtp.*",
    "*visual*",
    "*vision_tower*",
    "*embed_tokens",
]


@dataclass
class QuantConfig:
    method: str  # MODELOPT | COMPRESSED_TENSORS | ON_THE_FLY
    ignore: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=lambda: ["Linear"])  # compressed-tensors only
    has_input_scales: bool = False  # static activation global scales in the files (W4A4 checkpoints)
    has_pre_quant_scale: bool = False  # ModelOpt AWQ
    kv_cache_algo: str | None = None  # "FP8" | "NVFP4" | None, as the checkpoint declares

    def matches(self, name: str, pattern: str) -> bool:
        if self.method == COMPRESSED_TENSORS:
            if pattern.startswith("re:"):
                return re.match(pattern[3:], name) is not None
            return pattern == name
        # ModelOpt patterns are written against quantizer paths too ("*mlp.gate.*"): try both forms.
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name + ".", pattern)

    def ignored_by(self, name: str) -> str | None:
        """The ignore entry that keeps module `name` unquantized, if any."""
        return next((p for p in self.ignore if self.matches(name, p)), None)

    def targeted(self, name: str) -> bool:
        if self.method != COMPRESSED_TENSORS:
            return True
        return "Linear" in self.targets or any(self.matches(name, t) for t in self.targets)

    def quantizes(self, name: str) -> bool:
        return self.targeted(name) and self.ignored_by(name) is None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e


def _modelopt(quant: dict, source: str) -> QuantConfig:
    algo = str(quant.get("quant_algo", "")).upper()
    if algo not in MODELOPT_NVFP4_ALGOS:
        raise UnsupportedModelError(
            f"{source}: ModelOpt quant_algo {algo or None!r} is not supported (fp4serve loads {', '.join(MODELOPT_NVFP4_ALGOS)})"
        )
    group_size = quant.get("group_size", 16)
    if group_size != 16:
        raise UnsupportedModelError(f"{source}: NVFP4 group_size {group_size}; only 16 exists")
    ignore = list(quant.get("exclude_modules") or quant.get("ignore") or [])
    kv = quant.get("kv_cache_quant_algo")
    return QuantConfig(
        MODELOPT,
        ignore=ignore,
        has_input_scales=algo != "W4A16_NVFP4",
        has_pre_quant_scale=algo == "NVFP4_AWQ",
        kv_cache_algo=str(kv).upper() if kv else None,
    )


def _compressed_tensors(quant: dict, source: str) -> QuantConfig:
    fmt = quant.get("format")
    groups = quant.get("config_groups") or {}
    if fmt != "nvfp4-pack-quantized" and not (
        groups and all(g.get("format") == "nvfp4-pack-quantized" for g in groups.values())
    ):
        raise UnsupportedModelError(
            f"{source}: compressed-tensors format {fmt!r} is not supported (fp4serve loads nvfp4-pack-quantized)"
        )
    if len(groups) != 1:
        raise UnsupportedModelError(f"{source}: {len(groups)} config_groups; fp4serve loads one NVFP4 group")
    (group,) = groups.values()
    weights = group.get("weights") or {}
    if (weights.get("num_bits"), weights.get("type"), weights.get("group_size")) != (4, "float", 16):
        raise UnsupportedModelError(f"{source}: weights {weights} are not NVFP4 (4-bit float, groups of 16)")
    activations = group.get("input_activations")
    kv = quant.get("kv_cache_scheme")
    kv_algo = None
    if kv:
        kv_algo = "NVFP4" if kv.get("num_bits") == 4 else "FP8"
    return QuantConfig(
        COMPRESSED_TENSORS,
        ignore=list(quant.get("ignore") or []),
        targets=list(group.get("targets") or ["Linear"]),
        has_input_scales=bool(activations),
        kv_cache_algo=kv_algo,
    )


def detect_quantization(model_dir: str | Path) -> QuantConfig | None:
    """The checkpoint's quantization, or None for plain 16/32-bit weights."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    hf_quant = model_dir / "hf_quant_config.json"
    if quant:
        method = quant.get("quant_method")
        if method == MODELOPT:
            return _modelopt(quant, f"{model_dir}/config.json")
        if method == COMPRESSED_TENSORS:
            return _compressed_tensors(quant, f"{model_dir}/config.json")
        raise UnsupportedModelError(
            f"{model_dir}: quant_method {method!r} is not supported (fp4serve loads NVFP4 from modelopt or compressed-tensors)"
        )
    if hf_quant.exists():
        return _modelopt(_read_json(hf_quant).get("quantization") or {}, str(hf_quant))
    return None


def resolve_quantization(requested: str | None, detected: QuantConfig | None, model_dir) -> QuantConfig | None:
    """Check `--quantization` against the files, as vLLM does; None asks for auto-detection."""
    if requested is None:
        return detected
    if requested == ON_THE_FLY:
        if detected is not None:
            raise ConfigError(
                f"--quantization nvfp4 quantizes a 16-bit checkpoint at load, but {model_dir} is already "
                f"quantized ({detected.method}); drop the flag"
            )
        return QuantConfig(ON_THE_FLY, ignore=list(DEFAULT_EXCLUDES))
    if detected is None:
        raise ConfigError(
            f"--quantization {requested}: {model_dir} holds no quantized weights (no quantization_config)"
        )
    if detected.method != requested:
        raise ConfigError(f"--quantization {requested}, but {model_dir} is a {detected.method} checkpoint")
    return detected
