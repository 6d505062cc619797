"""GGUF -> Hugging Face directory.

llama.cpp's GGUF format packs a model's config, tokenizer and (usually quantized) weights into one
file. fp4serve loads Hugging Face directories only, so a GGUF is converted once, up front:

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/SmolLM2-135M-Instruct")

writes `config.json`, `generation_config.json`, `model.safetensors` (dequantized, HF tensor names),
`tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`. Only the Llama architecture is
supported. The output appears all at once (written to a hidden sibling, then renamed), so a crash
never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from tqdm import tqdm

from fp4serve.errors import CheckpointError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"

# GGUF tensor name (after `blk.N.`) -> Hugging Face name (after `model.layers.N.`).
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def convert_gguf(
    src: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, progress: bool = True
) -> Path:
    """Convert the Llama GGUF file `src` into a Hugging Face directory `out_dir`; return `out_dir`.

    Weights are dequantized and stored in `dtype`. `out_dir` must not exist yet (or be empty):
    FileExistsError otherwise. CheckpointError if `src` is not a readable GGUF file,
    UnsupportedModelError if it holds an architecture or feature this converter does not know.
    """
    src, out_dir = Path(src), Path(out_dir)
    if _occupied(out_dir):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    reader = _open(src)
    config = _llama_config(reader, dtype)

    # A hidden sibling, so the final rename stays on one file system. Not tempfile.mkdtemp: its
    # 0700 mode would carry over to the published directory.
    staging = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        _write_json(staging / "config.json", config)
        tensors = _llama_tensors(reader, config, dtype, progress)
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        # safetensors always creates its file 0600; give it the mode (umask) of our other files.
        shutil.copymode(staging / "config.json", staging / "model.safetensors")
        del tensors  # free the weights before the tokenizer step allocates its own
        generation = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
        _write_json(staging / "generation_config.json", generation)
        _write_tokenizer(src, reader, staging)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _open(src: Path) -> GGUFReader:
    """A reader for `src`, or a CheckpointError that says what is wrong with the file."""
    try:
        with open(src, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file {src}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{src} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        return GGUFReader(src)
    except (ValueError, IndexError) as exc:
        # GGUFReader reports a short file as a failed numpy view or reshape somewhere in the parse.
        raise CheckpointError(f"{src} is a truncated or corrupt GGUF file ({exc})") from exc


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _required(reader: GGUFReader, key: str):
    value = _field(reader, key)
    if value is None:
        raise CheckpointError(f"GGUF metadata lacks {key!r}")
    return value


def _float32(value: float) -> float:
    """GGUF stores floats as float32; keep the short decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _llama_config(reader: GGUFReader, dtype: torch.dtype) -> dict:
    """The Hugging Face `config.json` of a Llama GGUF, from its metadata."""
    arch = _required(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    rope_scaling = _field(reader, "llama.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise UnsupportedModelError(f"GGUF rope scaling {rope_scaling!r} is not supported")

    hidden = _required(reader, "llama.embedding_length")
    heads = _required(reader, "llama.attention.head_count")
    head_dim = _field(reader, "llama.attention.key_length", hidden // heads)
    rotary_dim = _field(reader, "llama.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise UnsupportedModelError(f"partial rotary ({rotary_dim} of {head_dim} dims) is not supported")
    rope_theta = _float32(_field(reader, "llama.rope.freq_base", 10000.0))
    vocab_size = _field(reader, "llama.vocab_size") or len(_required(reader, "tokenizer.ggml.tokens"))
    dtype_name = str(dtype).removeprefix("torch.")

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _required(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _required(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _required(reader, "llama.context_length"),
        "rms_norm_eps": _float32(_required(reader, "llama.attention.layer_norm_rms_epsilon")),
        # transformers 5 reads rope_parameters; older readers (and vLLM) still read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_theta": rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        # llama.cpp writes no output.weight when the head shares the embedding.
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        token_id = _field(reader, f"tokenizer.ggml.{gguf_key}")
        if token_id is not None:
            config[key] = token_id
    return config


def _hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; UnsupportedModelError if unknown."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS and parts[1] == "weight":
        return f"{_GLOBAL_TENSORS[parts[0]]}.weight"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no Llama equivalent")


def _unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order.

    Hugging Face rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent
    pairs, so its converter reorders each head's rows from [first half, second half] to interleaved
    pairs (`permute` in convert_hf_to_gguf.py: reshape(heads, 2, d/2, ...).swapaxes(1, 2)). The
    inverse reads the rows as (heads, d/2, 2) and swaps the last two axes back.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _llama_tensors(reader: GGUFReader, config: dict, dtype: torch.dtype, progress: bool) -> dict:
    """Every GGUF tensor, dequantized, renamed to Hugging Face and cast to `dtype`."""
    rotary_heads = {
        "self_attn.q_proj": config["num_attention_heads"],
        "self_attn.k_proj": config["num_key_value_heads"],
    }
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="Converting GGUF tensors", unit="tensor", disable=not progress):
        name = _hf_name(tensor.name)
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"GGUF tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from exc
        # F32 tensors come back as read-only views of the memory-mapped file; torch wants its own copy.
        weight = torch.from_numpy(np.array(values, dtype=np.float32))
        for module, heads in rotary_heads.items():
            if f".{module}." in name:
                weight = _unpermute_rotary(weight, heads)
        tensors[name] = weight.to(dtype).contiguous()
    return tensors


# llama.cpp names the pre-tokenizer (how text is split before BPE) in `tokenizer.ggml.pre`.
# transformers' GGUF tokenizer knows only some names and falls back to GPT-2's split for the
# rest, which is wrong for SmolLM: its vocabulary was trained with every digit split off first,
# so e.g. "x  1" must give ["x", "ĠĠ", "1"], not ["x", "Ġ", "Ġ", "1"] (as llama.cpp and SmolLM's own
# tokenizer.json do).
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ]),
}


def _write_tokenizer(src: Path, reader: GGUFReader, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, from the GGUF's tokenizer metadata."""
    # Imported here: transformers is slow to import and only this step needs it.
    from transformers import PreTrainedTokenizerFast

    # transformers rebuilds a fast tokenizer from the vocabulary, merges and special tokens stored
    # in the GGUF metadata; reading a local file, it needs no network. AutoTokenizer gives the
    # same tokenizer but first parses the whole file again for a config (seconds, not 0.5 s).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(src.parent, gguf_file=src.name)
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre in _PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    # Without this transformers writes its "unlimited" placeholder (1e30) as the maximum length.
    tokenizer.model_max_length = _required(reader, "llama.context_length")
    tokenizer.save_pretrained(out)
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished `staging` dir to `out_dir` in one rename."""
    try:
        # Replaces an empty out_dir; fails if another process published a non-empty one meanwhile.
        os.rename(staging, out_dir)
    except OSError as exc:
        if _occupied(out_dir):
            raise FileExistsError(f"{out_dir} appeared while converting") from exc
        raise


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))
