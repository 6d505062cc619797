"""MTP head: config and tensors agree; a quantized checkpoint keeps its 16-bit head out of NVFP4.

M01 `mtp_num_hidden_layers` and the `mtp.layers.*` tensors disagree; M02 `mtp.*` modules stored
16-bit that the quantization config would quantize (vLLM then crashes loading the head)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fp4serve.errors import Fp4ServeError
from fp4serve.formats.checkpoint import detect_quantization
from fp4serve.toolkit.doctor.findings import ERROR, WARNING, Context, Finding, listing
from fp4serve.toolkit.doctor.rules_quant import layout_of, modules_of
from fp4serve.toolkit.quant_lists import PREFIX_PATTERN


def check(ctx: Context) -> Iterator[Finding]:
    if ctx.config is None:
        return
    tensors = ctx.tensors
    mtp = sorted(n for n in tensors if n.startswith("mtp."))
    layers = {int(m.group(1)) for n in mtp if (m := re.match(r"mtp\.layers\.(\d+)\.", n))}
    declared = ctx.text_config.get("mtp_num_hidden_layers") or 0
    where = "text_config.mtp_num_hidden_layers" if "text_config" in ctx.config else "mtp_num_hidden_layers"
    if declared and not mtp:
        yield Finding(
            WARNING, "M01", f"config.json {where} is {declared} but there are no mtp.* tensors: MTP speculative "
            "decoding (qwen3_5_mtp) fails to load", "fp4serve graft-mtp DIR --from BASE (the 16-bit source checkpoint)",
        )  # fmt: skip
    elif mtp and not declared:
        yield Finding(
            ERROR, "M01", f"{len(mtp)} mtp.* tensors but config.json has no {where}: vLLM's qwen3_5_mtp reads it and "
            "finds no head", f"set {where} to {len(layers) or 1}",
        )  # fmt: skip
    elif mtp and len(layers) != declared:
        yield Finding(ERROR, "M01", f"config.json {where} is {declared}, the tensors hold {len(layers)} MTP layers",
                      f"set {where} to {len(layers)}, or graft the full head again (fp4serve graft-mtp --force)")  # fmt: skip
    if not mtp:
        return
    try:
        quant = detect_quantization(ctx.path)
    except Fp4ServeError:
        return
    if quant is None:
        return
    modules = modules_of(ctx)
    exposed = sorted(
        m for m, params in modules.items()
        if m.startswith("mtp.") and not layout_of(params) and "weight" in params and len(params["weight"][1].shape) >= 2
        and quant.quantizes(m)
    )  # fmt: skip
    if exposed:
        pattern = PREFIX_PATTERN.get(quant.method, lambda p: p + "*")("mtp.")
        yield Finding(
            ERROR, "M02",
            f"{len(exposed)} 16-bit mtp.* modules are not in the quantization ignore list ({listing(exposed, 4)}): "
            "loaders build them as NVFP4 and fail on the 16-bit weights (vLLM crashes at load)",
            f"add {pattern!r} to the ignore/exclude lists (fp4serve graft-mtp does this when it grafts)",
        )  # fmt: skip
