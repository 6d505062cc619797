"""Quantization: configs loaders refuse, NVFP4 modules with missing or malformed tensors, ignore
entries that match nothing, modules that must stay 16-bit, and fused groups vLLM would distort.

Q01 quant_algo / format a loader refuses; Q02 a quantized module missing one of its tensors;
Q03 wrong dtype or shape; Q04 an ignore entry matching no module; Q05 a module that should stay
16-bit stored NVFP4; Q06 fused shards with different global scales (with the weight error vLLM's
take-the-largest causes); Q07 a fused group only partly quantized. Q08 is in rules_names.py."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch
from safetensors import safe_open

from fp4serve.errors import Fp4ServeError
from fp4serve.formats.checkpoint import COMPRESSED_TENSORS, MODELOPT, QuantConfig, detect_quantization
from fp4serve.formats.nvfp4 import NVFP4Tensor, dequantize_nvfp4
from fp4serve.toolkit.doctor.findings import ERROR, WARNING, Context, Finding, listing
from fp4serve.toolkit.doctor.skeleton import expand_fused_experts

# vLLM's modelopt.py QUANT_ALGOS (docs/reference.md section 2); NVFP4_SVD, NVFP4_AWQ are not in it.
VLLM_MODELOPT_ALGOS = (
    "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN",
    "FP8_PB_WO",
    "NVFP4",
    "W4A16_NVFP4",
    "MXFP8",
    "MIXED_PRECISION",
)
FUSED_GROUPS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("in_proj_qkv", "in_proj_z"),
    ("in_proj_b", "in_proj_a"),
)
LAYOUT = {
    COMPRESSED_TENSORS: {"packed": "weight_packed", "scale": "weight_scale", "global": "weight_global_scale",
                         "input": "input_global_scale"},
    MODELOPT: {"packed": "weight", "scale": "weight_scale", "global": "weight_scale_2", "input": "input_scale"},
}  # fmt: skip
# Modules that stay 16-bit, and how bad quantizing them is (ERROR: a loader cannot take it).
KEEP_16BIT = (
    (("conv1d",), "the GDN causal conv (vLLM builds it unquantized; FP4 drifts the recurrence)", ERROR, ERROR),
    (("norm",), "a norm (not a Linear)", ERROR, ERROR),
    (("A_log", "dt_bias"), "GDN decay parameters (not Linears)", ERROR, ERROR),
    (("mlp.gate",), "the MoE router (vLLM builds it unquantized)", ERROR, WARNING),
    (("shared_expert_gate",), "the shared-expert gate (vLLM builds it unquantized)", ERROR, WARNING),
    (("in_proj_a", "in_proj_b"), "GDN gate projections (ModelOpt's default keeps them 16-bit)", WARNING, WARNING),
)


def modules_of(ctx: Context) -> dict[str, dict]:
    """checkpoint module -> {param: (header, entry)}."""
    modules: dict[str, dict] = defaultdict(dict)
    for name, (header, entry) in ctx.tensors.items():
        module, _, param = name.rpartition(".")
        modules[module][param] = (header, entry)
    return modules


def layout_of(params: dict) -> str | None:
    if "weight_packed" in params:
        return COMPRESSED_TENSORS
    weight = params.get("weight")
    if "weight_scale_2" in params or (weight and weight[1].dtype == "U8"):
        return MODELOPT
    return None


def check(ctx: Context) -> Iterator[Finding]:
    if ctx.config is None:
        return
    quant, refusal = None, None
    try:
        quant = detect_quantization(ctx.path)
    except Fp4ServeError as e:
        refusal = str(e)
    severity = ctx.severity(fp4serve=ERROR)
    if refusal and severity:
        yield Finding(severity, "Q01", refusal, "re-export with quant_algo NVFP4 (W4A4) or W4A16_NVFP4")
    algo = _modelopt_algo(ctx)
    severity = ctx.severity(vllm=ERROR)
    if algo and algo not in VLLM_MODELOPT_ALGOS and severity:
        yield Finding(
            severity, "Q01", f"ModelOpt quant_algo {algo!r} is not one vLLM loads ({', '.join(VLLM_MODELOPT_ALGOS)})",
            "re-export with quant_algo NVFP4 or W4A16_NVFP4" + ("" if refusal else " (fp4serve serves it as it is)"),
        )  # fmt: skip
    modules = modules_of(ctx)
    quantized = {m: layout_of(p) for m, p in modules.items() if layout_of(p)}
    yield from _module_tensors(ctx, modules, quantized, quant)
    if quant is not None and quant.method in (MODELOPT, COMPRESSED_TENSORS):
        yield from _unmatched_ignores(modules, quant)
    yield from _keep_16bit(ctx, quantized)
    if ctx.severity(vllm=WARNING):
        yield from _fused_groups(ctx, modules, quantized)
    else:
        yield from _partial_groups_only(ctx, modules, quantized)


def _modelopt_algo(ctx: Context) -> str | None:
    quant = (ctx.config or {}).get("quantization_config") or {}
    if quant.get("quant_method") == MODELOPT:
        return str(quant.get("quant_algo", "")).upper() or None
    if not quant and ctx.hf_quant:
        return str((ctx.hf_quant.get("quantization") or {}).get("quant_algo", "")).upper() or None
    return None


def _module_tensors(ctx, modules, quantized, quant) -> Iterator[Finding]:
    incomplete, malformed = [], []
    for module, layout in sorted(quantized.items()):
        names = LAYOUT[layout]
        params = modules[module]
        required = ["packed", "scale", "global"] + (["input"] if quant and quant.has_input_scales else [])
        lacking = [names[k] for k in required if names[k] not in params]
        if lacking:
            incomplete.append(f"{module} (no {', '.join(lacking)})")
            continue
        packed, scale, glob = (params[names[k]][1] for k in ("packed", "scale", "global"))
        problems = []
        if packed.dtype != "U8" or len(packed.shape) != 2:
            problems.append(f"{names['packed']} is {packed.dtype} {list(packed.shape)}, not uint8 [out, in/2]")
        if scale.dtype != "F8_E4M3":
            problems.append(f"weight_scale is {scale.dtype}, not float8_e4m3fn")
        if len(packed.shape) == 2 and (
            len(scale.shape) != 2 or scale.shape[0] != packed.shape[0] or scale.shape[1] * 8 != packed.shape[1]
        ):
            problems.append(
                f"weight_scale is {list(scale.shape)}, packed {list(packed.shape)} needs [{packed.shape[0]}, {packed.shape[1] // 8}]"
            )
        for entry in [glob] + ([params[names["input"]][1]] if names["input"] in params else []):
            if entry.dtype != "F32" or entry.nbytes != 4:
                problems.append(
                    f"{entry.name.rpartition('.')[2]} is {entry.dtype} {list(entry.shape)}, not one float32"
                )
        if problems:
            malformed.append(f"{module}: {'; '.join(problems)}")
    if incomplete:
        yield Finding(ERROR, "Q02", f"{len(incomplete)} NVFP4 modules lack tensors: {listing(incomplete, 5)}",
                      "re-export these modules from the quantizer (their tensors were lost)")  # fmt: skip
    if malformed:
        yield Finding(ERROR, "Q03", f"{len(malformed)} NVFP4 modules have malformed tensors: {listing(malformed, 5)}",
                      "re-export these modules from the quantizer")  # fmt: skip


def _unmatched_ignores(modules, quant: QuantConfig) -> Iterator[Finding]:
    names = set()
    for module, params in modules.items():
        for param, (_, entry) in params.items():
            names.update(n.rpartition(".")[0] for n in expand_fused_experts(f"{module}.{param}", entry.shape))
    unmatched = [p for p in quant.ignore if not any(quant._matches(m, p) for m in names)]
    if unmatched:
        yield Finding(
            WARNING, "Q04", f"quantization ignore entries that match no module of the checkpoint: {listing(unmatched)}",
            "correct the names (they are matched against the checkpoint's module names) or remove them",
        )  # fmt: skip


def _keep_16bit(ctx, quantized) -> Iterator[Finding]:
    for keys, why, vllm, ours in KEEP_16BIT:
        hits = [m for m in quantized if any(m.endswith("." + key) or m == key for key in keys)]
        severity = ctx.severity(vllm=vllm, fp4serve=ours)
        if hits and severity:
            yield Finding(severity, "Q05", f"{len(hits)} modules are NVFP4 but should stay 16-bit, {why}: {listing(hits)}",
                          "re-quantize with these modules in the ignore list (ModelOpt's NVFP4 default keeps them)")  # fmt: skip


def _partial_groups_only(ctx, modules, quantized) -> Iterator[Finding]:
    yield from _fused_groups(ctx, modules, quantized, measure=False)


def _fused_groups(ctx, modules, quantized, measure: bool = True) -> Iterator[Finding]:
    partial, distorted = [], []
    for module in sorted(modules):
        parent, _, leaf = module.rpartition(".")
        group = next((g for g in FUSED_GROUPS if g[0] == leaf), None)
        members = [f"{parent}.{m}" for m in group or () if f"{parent}.{m}" in modules]
        if not group or len(members) < 2:
            continue
        flags = [m in quantized for m in members]
        if any(flags) and not all(flags):
            partial.append(f"{parent}.{{{','.join(m.rpartition('.')[2] for m in members)}}}")
            continue
        if all(flags) and measure:
            error = _take_largest_error(modules, members, quantized[members[0]])
            if error is not None:
                distorted.append((parent, members, error))
    if partial:
        yield Finding(ERROR, "Q07", f"fused groups with some projections quantized and others not: {listing(partial, 5)}",
                      "quantize all projections of a group or none (fix the ignore list and re-export)")  # fmt: skip
    if distorted:
        worst = max(distorted, key=lambda d: max(d[2].values()))
        detail = ", ".join(f"{m.rpartition('.')[2]} {e:.1%}" for m, e in worst[2].items())
        yield Finding(
            WARNING, "Q06",
            f"{len(distorted)} fused groups have different global scales per shard ({listing([d[0] for d in distorted], 4)}); "
            f"vLLM uses the largest for all shards, which changes the weights: worst {worst[0]}: relative weight "
            f"error {detail} (fp4serve keeps one scale per shard: exact)",
            "re-quantize with one global scale per fused group (llmcompressor/ModelOpt fuse the scales by default)",
        )  # fmt: skip


def _read(header, entry) -> torch.Tensor:
    with safe_open(str(header.path), framework="pt") as f:
        return f.get_tensor(entry.name)


def _take_largest_error(modules, members, layout) -> dict[str, float] | None:
    """Per shard, ||W_used - W|| / ||W|| when every shard takes the largest stored global scale."""
    key = LAYOUT[layout]["global"]
    stored = {m: _read(*modules[m][key]).float().reshape(()) for m in members if key in modules[m]}
    if len(stored) != len(members) or len({v.item() for v in stored.values()}) == 1:
        return None
    largest = max(stored.values(), key=lambda v: v.item())
    # ModelOpt stores the multiplier g; compressed-tensors its reciprocal
    as_multiplier = (lambda v: v) if layout == MODELOPT else (lambda v: 1.0 / v)
    errors = {}
    for m in members:
        params = modules[m]
        packed = _read(*params[LAYOUT[layout]["packed"]])
        scale = _read(*params["weight_scale"])
        own = dequantize_nvfp4(NVFP4Tensor(packed, scale, as_multiplier(stored[m])))
        used = dequantize_nvfp4(NVFP4Tensor(packed, scale, as_multiplier(largest)))
        norm = own.norm().item()
        errors[m] = (used - own).norm().item() / norm if norm else 0.0
    return errors
