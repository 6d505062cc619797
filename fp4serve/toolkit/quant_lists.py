"""The lists of modules a quantized checkpoint keeps in 16 bits, wherever the layout writes them:
compressed-tensors' config.json `quantization_config.ignore`; ModelOpt's hf_quant_config.json
`quantization.exclude_modules` and config.json `quantization_config` `ignore` / `exclude_modules`
(docs/reference.md section 2). Surgery edits all of them together so loaders that read one and
loaders that read the other agree."""

from __future__ import annotations

from collections.abc import Callable

from fp4serve.formats.checkpoint import COMPRESSED_TENSORS, MODELOPT

# One entry that keeps every module under a prefix in 16 bits, in each layout's pattern syntax
# (compressed-tensors: `re:` + re.match; ModelOpt: fnmatch wildcards).
PREFIX_PATTERN = {COMPRESSED_TENSORS: lambda prefix: "re:^" + prefix.replace(".", r"\.") + ".*",
                  MODELOPT: lambda prefix: prefix + "*"}  # fmt: skip


def _config_quant(config: dict) -> dict | None:
    return config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")


def quant_method(config: dict, hf_quant: dict | None) -> str | None:
    quant = _config_quant(config)
    if quant:
        return quant.get("quant_method")
    return MODELOPT if hf_quant and hf_quant.get("quantization") else None


def ignore_lists(config: dict, hf_quant: dict | None) -> list[list[str]]:
    """The ignore/exclude lists (the list objects themselves, to edit in place), created where a
    quantization config exists without one."""
    lists = []
    quant = _config_quant(config)
    if quant:
        keys = [k for k in ("ignore", "exclude_modules") if isinstance(quant.get(k), list)]
        for key in keys or ["ignore"]:
            lists.append(quant.setdefault(key, []))
    if hf_quant and isinstance(hf_quant.get("quantization"), dict):
        lists.append(hf_quant["quantization"].setdefault("exclude_modules", []))
    return lists


def edit_ignore_lists(config: dict, hf_quant: dict | None, edit: Callable[[list[str]], list[str]]) -> bool:
    """Replace every list by edit(list); True when any changed."""
    changed = False
    for entries in ignore_lists(config, hf_quant):
        new = edit(list(entries))
        if new != entries:
            entries[:] = new
            changed = True
    return changed
