"""Which decoder-layer Linears `fp4serve quantize` turns into NVFP4 (docs/quantization.md, "Recipes").

Patterns are fnmatch wildcards over the source checkpoint's own module names
(`model.language_model.layers.3.linear_attn.in_proj_qkv`). Everything outside the decoder layers
(embeddings, lm_head, the MTP head `mtp.*`, the vision tower) and every non-Linear parameter (norms,
GDN conv1d, A_log, dt_bias) is copied 16-bit whatever the recipe says."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from fp4serve.errors import ConfigError

# Kept 16-bit by every recipe, and refused by --include: vLLM builds the MoE router and the
# shared-expert gate unquantized (a quantized one cannot be loaded).
ALWAYS_16BIT = {
    "*mlp.gate": "the MoE router (vLLM builds it unquantized)",
    "*shared_expert_gate": "the shared-expert gate (vLLM builds it unquantized)",
}
# The Gated DeltaNet projections the regular recipe keeps 16-bit and xs quantizes (the XS model
# card lists in_proj_qkv, in_proj_z, in_proj_a/b and out_proj; conv1d stays 16-bit in both).
GDN_PROJECTIONS = ["*linear_attn.in_proj_qkv", "*linear_attn.in_proj_z", "*linear_attn.in_proj_a",
                   "*linear_attn.in_proj_b", "*linear_attn.out_proj"]  # fmt: skip
RECIPES = {
    "regular": GDN_PROJECTIONS,  # patterns kept 16-bit on top of ALWAYS_16BIT
    "xs": [],
}


@dataclass
class Recipe:
    name: str
    exclude: list[str] = field(default_factory=list)  # --exclude: kept 16-bit
    include: list[str] = field(default_factory=list)  # --include: quantized although the recipe keeps them

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ConfigError(f"unknown recipe {self.name!r} (choose from {', '.join(RECIPES)})")
        for pattern in self.include:
            for always, why in ALWAYS_16BIT.items():
                if pattern == always or fnmatch.fnmatchcase(always.lstrip("*"), pattern.lstrip("*")):
                    raise ConfigError(f"--include {pattern!r} would quantize {why}; it must stay 16-bit")

    def kept_by(self, module: str) -> str | None:
        """Why `module` (a decoder-layer Linear, checkpoint spelling) stays 16-bit, or None to quantize it."""
        for pattern, why in ALWAYS_16BIT.items():
            if fnmatch.fnmatchcase(module, pattern):
                return why
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(module, pattern):
                return f"--exclude {pattern}"
        if any(fnmatch.fnmatchcase(module, p) for p in self.include):
            return None
        for pattern in RECIPES[self.name]:
            if fnmatch.fnmatchcase(module, pattern):
                return f"recipe {self.name}: {pattern}"
        return None
