"""Names: what the declared architecture would not load, or needs and does not find.

N01 vision tower mis-nested under `model.language_model.visual.` (vLLM skip-loads it silently);
N02 tensors no parameter takes; N03 parameters no tensor fills; N04 a multimodal architecture without
its vision tower; N05 an architecture fp4serve cannot check; Q08 a module stored in one form (16-bit
or NVFP4) while the quantization lists ask for the other (mtp.* is the mtp rules' M02)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from fp4serve.config import ModelInfo
from fp4serve.errors import Fp4ServeError, UnsupportedModelError
from fp4serve.formats.checkpoint import detect_quantization
from fp4serve.models.kv_scales import SUFFIXES as KV_SCALE_SUFFIXES
from fp4serve.multimodal.image_processor import PREPROCESSOR_CONFIG
from fp4serve.toolkit.doctor.findings import ERROR, WARNING, Context, Finding, listing
from fp4serve.toolkit.doctor.skeleton import build_skeleton, expand_fused_experts

MISNESTED = "model.language_model.visual."
QUANTIZED_PARAMS = {"weight_packed", "weight_scale", "weight_scale_2", "weight_global_scale"}


def check(ctx: Context) -> Iterator[Finding]:
    if ctx.config is None:
        return
    tensors = ctx.tensors
    misnested = sorted(n for n in tensors if n.startswith(MISNESTED))
    if misnested:
        # fp4serve builds the tower (and refuses these) when the checkpoint can preprocess images;
        # without preprocessor_config.json it serves text only and drops them.
        takes_images = (ctx.path / PREPROCESSOR_CONFIG).exists()
        severity = ctx.severity(vllm=ERROR, fp4serve=ERROR if takes_images else WARNING)
        yield Finding(
            severity, "N01",
            f"{len(misnested)} vision tensors are nested under {MISNESTED}* ({listing(misnested, 3)}); the "
            "vision tower is built at model.visual, so vLLM skip-loads them silently and runs it uninitialized"
            + (", and fp4serve refuses them (unless --language-model-only)" if takes_images else ""),
            "fp4serve rename-tensors DIR --from model.language_model.visual. --to model.visual. "
            "(or fp4serve strip-vision DIR for text only)",
        )  # fmt: skip
    architectures = ctx.config.get("architectures") or []
    multimodal = any(a.endswith("ForConditionalGeneration") for a in architectures)
    if multimodal and not any(n.startswith(("model.visual.", MISNESTED)) for n in tensors):
        severity = ctx.severity(vllm=WARNING)
        if severity:
            yield Finding(
                severity, "N04",
                f"{architectures[0]} without vision tensors: vLLM builds the vision tower unless told not to",
                "serve vLLM with --language-model-only (or --limit-mm-per-prompt '{\"image\": 0, \"video\": 0}')",
            )  # fmt: skip
    if ctx.broken_files:
        return  # names cannot be compared on a partial checkpoint; the files rules said why
    try:
        quant = detect_quantization(ctx.path)
    except Fp4ServeError:
        return  # Q01 reports a quantization config fp4serve cannot read
    try:
        info = ModelInfo.load(ctx.path)
    except Fp4ServeError as e:
        yield Finding(ERROR, "F00", f"transformers cannot read config.json: {e}", "restore config.json from the source")
        return
    text = ctx.text_config
    with_mtp = any(n.startswith("mtp.") for n in tensors) or bool(text.get("mtp_num_hidden_layers"))
    try:
        skeleton = build_skeleton(info, quant, with_mtp)
    except UnsupportedModelError as e:
        severity = ctx.severity(vllm=WARNING, fp4serve=ERROR)
        yield Finding(severity, "N05", f"tensor names not checked: {e}", "use a supported architecture for fp4serve")
        return
    except Fp4ServeError:
        return  # a split fused group: the quantization rules (Q07) report it
    found: set[str] = set()
    unexpected = []
    by_module: dict[str, dict[str, str]] = defaultdict(dict)  # checkpoint module -> param -> dtype
    for name, (_, entry) in tensors.items():
        if (
            name.startswith(MISNESTED)
            or skeleton.dropped_by(name)
            or name.endswith(tuple(s for s, _ in KV_SCALE_SUFFIXES))
        ):
            continue
        module, _, param = skeleton.canonical(name).rpartition(".")
        by_module[module][param] = entry.dtype
        for expanded in expand_fused_experts(skeleton.canonical(name), entry.shape):
            if expanded in skeleton.expected or expanded in skeleton.optional:
                found.add(expanded)
            else:
                unexpected.append(name)
    missing = skeleton.expected - found
    expected_params: dict[str, set[str]] = defaultdict(set)
    for name in skeleton.expected:
        module, _, param = name.rpartition(".")
        expected_params[module].add(param)
    disagree = []
    for module, params in by_module.items():
        wanted = expected_params.get(module)
        if not wanted:
            continue
        stored_quantized = bool(QUANTIZED_PARAMS & set(params)) or params.get("weight") == "U8"
        if stored_quantized != bool(QUANTIZED_PARAMS & wanted):
            disagree.append((module, stored_quantized))
    for module, stored_quantized in sorted(disagree):
        unexpected = [n for n in unexpected if skeleton.canonical(n).rpartition(".")[0] != module]
        missing = {n for n in missing if n.rpartition(".")[0] != module}
    disagree = [(m, q) for m, q in disagree if not m.startswith("mtp.")]  # mtp.*: the mtp rules' M02
    if disagree:
        quantized = [m for m, q in disagree if q]
        plain = [m for m, q in disagree if not q]
        if quantized:
            yield Finding(
                ERROR, "Q08", f"{len(quantized)} modules are stored NVFP4 but the ignore list keeps them 16-bit: {listing(quantized)}",
                "remove them from the quantization ignore/exclude lists",
            )  # fmt: skip
        if plain:
            yield Finding(
                ERROR, "Q08",
                f"{len(plain)} modules are stored 16-bit but the quantization config quantizes them (no ignore entry): "
                f"{listing(plain)}; loaders expect NVFP4 tensors there",
                "add them to the quantization ignore/exclude lists",
            )  # fmt: skip
    if unexpected:
        yield Finding(
            ERROR, "N02",
            f"{len(unexpected)} tensors that {architectures[0]} does not load (vLLM skips such tensors silently): "
            f"{listing(unexpected)}",
            "rename them to the architecture's names (fp4serve rename-tensors), or remove them",
        )  # fmt: skip
    if missing:
        yield Finding(
            ERROR, "N03", f"{len(missing)} tensors {architectures[0]} needs are missing: {listing(missing)}",
            "restore them from the source checkpoint (fp4serve graft-mtp for an mtp.* head)",
        )  # fmt: skip
