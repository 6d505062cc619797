"""Rewrite a compressed-tensors NVFP4 checkpoint into NVIDIA ModelOpt's layout (docs/reference.md section 2).

The packed codes and FP8 block scales are the same bytes in both; the tensor names change and the
two global scales are inverted (compressed-tensors divides by them, ModelOpt multiplies). The output
loads in fp4serve and in vLLM's `modelopt` path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp4serve.errors import CheckpointError
from fp4serve.formats.checkpoint import COMPRESSED_TENSORS, detect_quantization
from fp4serve.formats.safetensors_io import INDEX_NAME, weight_files

_RENAMES = {"weight_packed": "weight", "weight_global_scale": "weight_scale_2", "input_global_scale": "input_scale"}
_INVERTED = {"weight_global_scale", "input_global_scale"}


def _modelopt_name(name: str) -> str:
    module, _, param = name.rpartition(".")
    return f"{module}.{_RENAMES.get(param, param)}"


def _convert_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        param = name.rpartition(".")[2]
        if param in _INVERTED:
            tensor = (1.0 / tensor.float()).to(torch.float32).reshape(())
        out[_modelopt_name(name)] = tensor
    return out


def compressed_tensors_to_modelopt(src: str | Path, dst: str | Path) -> Path:
    """Write the ModelOpt form of the compressed-tensors NVFP4 checkpoint `src` into `dst`."""
    src, dst = Path(src), Path(dst)
    quant = detect_quantization(src)
    if quant is None or quant.method != COMPRESSED_TENSORS:
        raise CheckpointError(f"{src} is not a compressed-tensors NVFP4 checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    excluded: set[str] = set()
    for path in weight_files(src):
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        quantized = {n.rpartition(".")[0] for n in tensors if n.endswith(".weight_packed")}
        for name, tensor in tensors.items():
            module = name.rpartition(".")[0]
            if name.endswith(".weight") and tensor.dim() == 2 and module not in quantized and quant.ignored_by(module):
                excluded.add(module)
        save_file(_convert_tensors(tensors), str(dst / path.name), metadata={"format": "pt"})
    index = src / INDEX_NAME
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_modelopt_name(k): v for k, v in data["weight_map"].items()}
        (dst / INDEX_NAME).write_text(json.dumps(data, indent=2))

    algo = "NVFP4" if quant.has_input_scales else "W4A16_NVFP4"
    kv = quant.kv_cache_algo
    common = {"quant_algo": algo, "kv_cache_quant_algo": kv, "group_size": 16}
    # hf_quant_config.json names the exclusions `exclude_modules`; config.json's newer form says `ignore`
    hf_quant = {
        "producer": {"name": "fp4serve", "version": "0.1.0"},
        "quantization": {**common, "exclude_modules": sorted(excluded)},
    }
    (dst / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", **common, "ignore": sorted(excluded)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", INDEX_NAME):
            shutil.copyfile(extra, dst / extra.name)
    return dst
