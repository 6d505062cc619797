"""Shared fixtures: tiny random checkpoints written by transformers itself (the oracle)."""
from __future__ import annotations

import os
from pathlib import Path

# Without a GPU the Triton kernels run under Triton's interpreter, on CPU tensors (tests/triton/).
# It must be set before triton is first imported.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from torch.overrides import TorchFunctionMode

torch.set_num_threads(min(2, os.cpu_count() or 1))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer over tokens "w0".."wN": any id sequence round-trips as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 3)}
    for i, special in enumerate(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]):
        vocab[special] = vocab_size - 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_checkpoint(path: Path, config, seed: int = 0):
    """Random weights with a wide init (so greedy text is not one repeated token), saved by
    transformers; returns the transformers model in fp32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    save_word_tokenizer(path, config.vocab_size)
    return model


def llama_family_configs() -> dict:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)  # fmt: skip
    return {
        "llama-tied": LlamaConfig(**common, tie_word_embeddings=True),
        "llama3-rope-untied": LlamaConfig(
            **common, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),  # fmt: skip
        "qwen2-bias": Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3-qknorm": Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
        "qwen2-sliding": Qwen2Config(
            **common, tie_word_embeddings=False, use_sliding_window=True, sliding_window=8, max_window_layers=1
        ),
        "llama-linear-rope": LlamaConfig(**common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "llama-yarn": LlamaConfig(
            **common, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 128},
        ),  # fmt: skip
    }


@pytest.fixture(scope="session")
def llama_family_checkpoints(tmp_path_factory) -> dict:
    """name -> (directory, transformers model)."""
    out = {}
    for i, (name, config) in enumerate(llama_family_configs().items()):
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_checkpoint(path, config, seed=i))
    return out


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> Path:
    """The embedded default model, converted once per test session (or reused from FP4SERVE_CACHE)."""
    from fp4serve.default_model import default_model_path

    if "FP4SERVE_CACHE" not in os.environ:
        os.environ["FP4SERVE_CACHE"] = str(tmp_path_factory.mktemp("fp4serve-cache"))
    return default_model_path()


def paged_batch(shapes, tables, block_size):
    """A ForwardBatch over paged KV for sequences (num_computed, query_len) with their block tables.
    Tables are padded with a block of the first sequence: padding must never be read as context."""
    from fp4serve.forward_batch import SequenceRows, build_batch

    seqs = [SequenceRows([0] * q, c, list(t)) for (c, q), t in zip(shapes, tables)]
    return build_batch(seqs, block_size, pad_block=tables[0][0])


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernel tests (tests/triton/) run: the GPU, else CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class host_reads_refused(TorchFunctionMode):
    """Within: making a tensor from host values, indexing with a host list (copied to the device), or
    reading device values on the host raises: what a CUDA graph cannot capture. A torch-function mode,
    so torch.Tensor itself is never patched."""

    READS = ("item", "tolist", "__int__", "__bool__", "__float__", "nonzero", "cpu")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" and len(args) > 1 else None
        listed = index if isinstance(index, tuple) else (index,)
        if func is torch.tensor or name in self.READS or any(isinstance(i, list) for i in listed):
            raise AssertionError(f"host synchronisation in the decode step: {name or func}")
        return func(*args, **(kwargs or {}))
