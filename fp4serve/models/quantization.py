"""Which weight format each Linear of a model gets, decided by the checkpoint's quantization config.

Ignore lists name checkpoint modules (`model.language_model.layers.0.self_attn.q_proj`), while our
Linears are fused and renamed (`model.layers.0.self_attn.qkv_proj`); `checkpoint_module_names` maps
one to the other with the model's own stacking and renaming rules, so the decision is made on the
names the user wrote."""

from __future__ import annotations

import logging

from fp4serve.errors import CheckpointError
from fp4serve.formats.checkpoint import ON_THE_FLY, QuantConfig
from fp4serve.layers.linear import LinearMethod
from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod

log = logging.getLogger(__name__)


def checkpoint_module_names(
    prefix: str, num_shards: int, stacked: list[tuple[str, str, int]], renames: list[tuple[str, str]]
) -> list[list[str]]:
    """Per shard, the checkpoint module names that may hold it (every prefix spelling the model
    accepts, e.g. with and without `language_model.`)."""
    shard_names = [prefix] * num_shards
    if num_shards > 1:
        for ours, theirs, index in stacked:
            if prefix.endswith("." + ours) and index < num_shards:
                shard_names[index] = prefix[: -len(ours)] + theirs
    result = []
    for name in shard_names:
        forms = [name] + [old + name[len(new) :] for old, new in renames if name.startswith(new)]
        result.append(forms)
    return result


class LinearMethodChooser:
    """Called by every Linear the model builds (see layers.linear.linear_methods)."""

    def __init__(self, quant: QuantConfig, stacked, renames, compute: str):
        self.quant = quant
        self.stacked = stacked
        self.renames = renames
        self.compute = compute
        self.matched_ignores: set[str] = set()
        self.num_quantized = 0
        self.kept: list[str] = []

    def __call__(self, prefix: str, output_sizes: list[int]) -> LinearMethod | None:
        decisions = []
        for forms in checkpoint_module_names(prefix, len(output_sizes), self.stacked, self.renames):
            ignored = [p for p in (self.quant.ignored_by(f) for f in forms) if p is not None]
            self.matched_ignores.update(ignored)
            decisions.append(not ignored and any(self.quant.targeted(f) for f in forms))
        if any(decisions) and not all(decisions):
            if self.quant.method == ON_THE_FLY:
                decisions = [False]  # our own choice: keep the whole fused Linear in 16 bits
            else:
                raise CheckpointError(
                    f"{prefix}: the checkpoint quantizes some of the projections fused here and not others "
                    f"({decisions}); fp4serve needs all or none of a fused group quantized"
                )
        if not decisions[0]:
            self.kept.append(prefix)
            return None
        self.num_quantized += 1
        return NVFP4LinearMethod(
            self.quant.method, self.compute, self.quant.has_input_scales, self.quant.has_pre_quant_scale
        )

    def report(self, present_modules: set[str]) -> None:
        """present_modules: the module names the checkpoint's tensors and the built model have, in the
        checkpoint's spelling. An ignore entry that matched no Linear but names one of those is
        expected (an embedding, a tied lm_head, a GDN conv, a vision tower, an MTP head the drafter
        loads); one that names nothing at all is reported, since it is likely mis-named."""
        unmatched = [p for p in self.quant.ignore if p not in self.matched_ignores]
        log.info(
            "NVFP4 (%s, %s): %d Linear layers quantized, %d kept in 16 bits%s",
            self.quant.method,
            self.compute,
            self.num_quantized,
            len(self.kept),
            f" ({', '.join(self.kept[:6])}{', ...' if len(self.kept) > 6 else ''})" if self.kept else "",
        )
        if not unmatched or self.quant.method == ON_THE_FLY:
            return
        absent = [p for p in unmatched if not any(self.quant.matches(name, p) for name in present_modules)]
        elsewhere = [p for p in unmatched if p not in absent]
        if elsewhere:
            log.info(
                "quantization ignore entries for modules that are not quantizable Linears here (embedding, tied "
                "lm_head, conv, vision tower, MTP head: kept as built or loaded by a drafter): %s",
                elsewhere,
            )
        if absent:
            log.warning("quantization ignore entries that match no module of this checkpoint (mis-named?): %s", absent)
