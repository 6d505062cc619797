"""Tiny checkpoints for the toolkit tests: 16-bit Qwen3.5 dense/MoE targets with an MTP head
(spec_checkpoints, written by transformers), a Qwen3_5ForConditionalGeneration with a small vision
tower (transformers' own class), and NVFP4 files made from them with fp4serve's codec in the
compressed-tensors layout (the ModelOpt layout through formats/nvfp4_layouts)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import save_word_tokenizer
from safetensors.torch import load_file, save_file
from spec_checkpoints import TEXT, VOCAB

from fp4serve.formats.checkpoint import COMPRESSED_TENSORS, QuantConfig
from fp4serve.formats.nvfp4 import quantize_nvfp4, to_ct_global_scale
from fp4serve.formats.nvfp4_layouts import compressed_tensors_to_modelopt

VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
          "patch_size": 4, "num_position_embeddings": 16}  # fmt: skip
# What llmcompressor's NVFP4 recipes leave in 16 bits for these models (exact names and regexes).
IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$", "re:.*in_proj_[ab]$", "re:.*visual.*"]
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"))


def make_vl(path: Path, seed: int = 0) -> None:
    """Qwen3_5ForConditionalGeneration (dense text + 1-block vision tower), saved by transformers."""
    torch.manual_seed(seed)
    text = {k: v for k, v in TEXT.items() if k != "mtp_num_hidden_layers"}
    hf = transformers.Qwen3_5ForConditionalGeneration(
        transformers.Qwen3_5Config(text_config=text, vision_config=VISION)
    )
    hf.eval().save_pretrained(path)
    save_word_tokenizer(path, VOCAB)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _is_linear_weight(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name and "norm" not in name


def _group_amax(name: str, src: dict[str, torch.Tensor], shared: bool) -> float:
    module = name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    members = [module]
    if shared:
        for group in FUSED:
            if leaf in group:
                members = [f"{parent}.{m}" for m in group if f"{parent}.{m}.weight" in src]
    return max(src[f"{m}.weight"].float().abs().max().item() for m in members)


def write_ct_nvfp4(src: Path, dst: Path, ignore=IGNORE, shared: bool = True, drop_mtp: bool = True) -> None:
    """A compressed-tensors nvfp4-pack-quantized (W4A16) copy of `src`: every Linear not ignored is
    quantized with fp4serve's codec; shared: one global scale per fused group (llmcompressor's way)."""
    weights = tensors(src)
    quant = QuantConfig(COMPRESSED_TENSORS, ignore=list(ignore))
    out = {}
    for name, t in weights.items():
        if drop_mtp and name.startswith("mtp."):
            continue
        module = name.rpartition(".")[0]
        if not _is_linear_weight(name, t) or not quant.quantizes(module) or name.startswith("mtp."):
            out[name] = t
            continue
        q = quantize_nvfp4(t.float(), global_scale=_group_amax(name, weights, shared) / 2688.0)
        out[f"{module}.weight_packed"] = q.packed
        out[f"{module}.weight_scale"] = q.block_scale
        out[f"{module}.weight_global_scale"] = to_ct_global_scale(q.global_scale).reshape(1)
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if drop_mtp:
        config.get("text_config", config).pop("mtp_num_hidden_layers", None)
    weights_args = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights_args, "input_activations": None,
                                      "format": "nvfp4-pack-quantized"}},
        "ignore": list(ignore),
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(extra, dst / extra.name)


def write_modelopt_nvfp4(src: Path, dst: Path, **kwargs) -> None:
    ct = dst.parent / (dst.name + "-ct")
    write_ct_nvfp4(src, ct, **kwargs)
    compressed_tensors_to_modelopt(ct, dst)
    shutil.rmtree(ct)


def split_into_shards(path: Path, first_prefix: str) -> None:
    """Rewrite a single-file checkpoint as two shards plus an index: tensors starting with
    `first_prefix` in the first shard, the rest in the second."""
    weights = load_file(str(path / "model.safetensors"))
    a = {k: v for k, v in weights.items() if k.startswith(first_prefix)}
    b = {k: v for k, v in weights.items() if not k.startswith(first_prefix)}
    (path / "model.safetensors").unlink()
    files = {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}
    weight_map = {}
    for file, part in files.items():
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


@functools.cache
def _build_all(root: Path) -> Path:
    """Every base checkpoint, built once per test session (root: the session's base temp dir)."""
    from spec_checkpoints import make_mtp_target

    root = root / "toolkit-checkpoints"
    root.mkdir()
    make_mtp_target(root / "dense16", moe=False)
    make_mtp_target(root / "moe16", moe=True, seed=1)
    write_ct_nvfp4(root / "dense16", root / "dense-ct")
    write_modelopt_nvfp4(root / "moe16", root / "moe-modelopt")
    make_vl(root / "vl16")
    return root


@pytest.fixture
def copy_of(tmp_path_factory, tmp_path):
    """copy_of("dense-ct") -> a private copy of that checkpoint (dense16, moe16: 16-bit with MTP head;
    dense-ct: compressed-tensors NVFP4 without head; moe-modelopt: ModelOpt NVFP4 without head; vl16:
    ConditionalGeneration with vision tower)."""
    built = _build_all(tmp_path_factory.getbasetemp())

    def copy(name: str, as_name: str | None = None) -> Path:
        dst = tmp_path / (as_name or name)
        shutil.copytree(built / name, dst)
        return dst

    return copy
