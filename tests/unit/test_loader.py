"""Strict loading, config and request validation, on a tiny Llama checkpoint written by transformers.

A good checkpoint loads through `fp4serve.LLM` and matches transformers' own forward. Copies of it
with one defect each (a tensor missing, extra, misshapen; the file truncated; an index naming a
missing shard; an unknown architecture) must fail with an error that names the tensor or the file.
A sharded copy must load to the same weights and outputs. Bad engine arguments give ConfigError,
bad prompts InvalidRequestError, and neither leaves the engine in a bad state.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from fp4serve import LLM, SamplingParams
from fp4serve.errors import CheckpointError, ConfigError, InvalidRequestError, UnsupportedModelError
from fp4serve.formats.safetensors_io import INDEX_NAME, iter_tensors

VOCAB = 300
MAX_LEN = 128
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT = {"prompt_token_ids": [5, 17, 42, 8, 99, 3, 250]}
ENGINE = {"dtype": "float32", "kv_cache_memory": "1MiB"}  # 2 layers x 2 KV heads x 8 dims: 256 blocks


def tiny_llama_config(tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-6, tie_word_embeddings=tied,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, make_checkpoint(path, tiny_llama_config())


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM(str(checkpoint[0]), **ENGINE)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


def variant(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of checkpoint directory `src` (config, tokenizer), with `tensors` as its weights."""
    shutil.copytree(src, dst)
    if tensors is not None:
        for f in dst.glob("*.safetensors"):
            f.unlink()
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def greedy_ids(llm: LLM) -> list[int]:
    return llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids


def load_error(path: Path, error=CheckpointError) -> str:
    with pytest.raises(error) as info:
        LLM(str(path), **ENGINE)
    return str(info.value)


# ---- the good checkpoint --------------------------------------------------------------------


def test_loads_and_matches_transformers(checkpoint, llm):
    """Greedy tokens equal transformers' argmax, step by step (its forward, not generate)."""
    _, hf = checkpoint
    ids = list(PROMPT["prompt_token_ids"])
    expected = []
    with torch.no_grad():
        for _ in range(GREEDY.max_tokens):
            token = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(token)
            ids.append(token)
    assert greedy_ids(llm) == expected
    engine = llm.engine
    assert engine.dtype == torch.float32
    assert engine.block_pool.num_free == engine.block_pool.num_blocks


def test_loaded_weights_equal_the_checkpoint(checkpoint, llm):
    """Fused q/k/v and gate/up hold the checkpoint's rows in order; the rest is copied as is."""
    tensors = read_tensors(checkpoint[0])
    model = llm.engine.model
    attn = model.model.layers[1].self_attn
    q, k, v = (tensors[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
    mlp_prefix = "model.layers.0.mlp"
    gate_up = torch.cat([tensors[f"{mlp_prefix}.gate_proj.weight"], tensors[f"{mlp_prefix}.up_proj.weight"]])
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


# ---- defective copies ------------------------------------------------------------------------


def test_missing_tensor(checkpoint, tmp_path):
    tensors = read_tensors(checkpoint[0])
    del tensors["model.layers.1.mlp.down_proj.weight"]
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert "missing" in msg and "model.layers.1.mlp.down_proj.weight" in msg


def test_missing_fused_tensor_is_named_as_in_the_checkpoint(checkpoint, tmp_path):
    tensors = read_tensors(checkpoint[0])
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert "missing" in msg and "model.layers.0.self_attn.q_proj.weight" in msg


def test_missing_fused_tensor_fails(checkpoint, tmp_path):
    """Whatever the name in the message, one missing shard of a fused Linear must fail the load."""
    tensors = read_tensors(checkpoint[0])
    del tensors["model.layers.0.mlp.up_proj.weight"]
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert "1 missing" in msg and "model.layers.0.mlp." in msg


def test_extra_tensor(checkpoint, tmp_path):
    tensors = read_tensors(checkpoint[0])
    tensors["model.layers.0.self_attn.rogue.weight"] = torch.zeros(4)
    tensors["model.extra_norm.weight"] = torch.zeros(4)
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert "unexpected" in msg
    assert "model.layers.0.self_attn.rogue.weight" in msg and "model.extra_norm.weight" in msg


def test_mis_nested_checkpoint_lists_its_names(checkpoint, tmp_path):
    """The "!!!!" failure mode: every name under an extra prefix. Nothing may load silently."""
    tensors = {"language_model." + k: v for k, v in read_tensors(checkpoint[0]).items()}
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert "21 missing" in msg and "21 unexpected" in msg
    assert "language_model.lm_head.weight" in msg  # names are listed sorted, at most 20 of them
    assert "(1 more)" in msg


@pytest.mark.parametrize(
    "name", ["model.norm.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"]
)
def test_wrong_shape(checkpoint, tmp_path, name):
    tensors = read_tensors(checkpoint[0])
    tensors[name] = tensors[name][:-1].clone()
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert name in msg and "shape" in msg


def test_wrong_shape_fused_tensor_is_named_as_in_the_checkpoint(checkpoint, tmp_path):
    tensors = read_tensors(checkpoint[0])
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1].clone()
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert name in msg


def test_wrong_shape_fused_tensor_fails(checkpoint, tmp_path):
    tensors = read_tensors(checkpoint[0])
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:, :-1].clone()
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert "shape" in msg and "model.layers.0.self_attn." in msg


def test_duplicate_tensor_across_shards(checkpoint, tmp_path):
    tensors = read_tensors(checkpoint[0])
    dst = variant(checkpoint[0], tmp_path / "ckpt", tensors)
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, str(dst / "model-extra.safetensors"))
    msg = load_error(dst)
    assert "model.norm.weight" in msg and "twice" in msg


@pytest.mark.parametrize("keep", ["header-cut", "data-cut", "4-bytes"])
def test_truncated_file(checkpoint, tmp_path, keep):
    dst = variant(checkpoint[0], tmp_path / "ckpt")
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cut = {"header-cut": 8 + header_len // 2, "data-cut": len(data) - 100, "4-bytes": 4}[keep]
    weights.write_bytes(data[:cut])
    msg = load_error(dst)
    assert "model.safetensors" in msg and "truncated" in msg


def test_corrupt_header(checkpoint, tmp_path):
    dst = variant(checkpoint[0], tmp_path / "ckpt")
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe{["
    weights.write_bytes(bytes(data))
    msg = load_error(dst)
    assert "model.safetensors" in msg


def test_no_weights_at_all(checkpoint, tmp_path):
    dst = variant(checkpoint[0], tmp_path / "ckpt")
    (dst / "model.safetensors").unlink()
    msg = load_error(dst)
    assert "no *.safetensors" in msg and str(dst) in msg


# ---- sharded checkpoints ---------------------------------------------------------------------


def shard(src: Path, dst: Path) -> Path:
    """A copy of `src` split into two safetensors files listed in model.safetensors.index.json."""
    tensors = read_tensors(src)
    dst = variant(src, dst)
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, file_names in files.items():
        save_file({n: tensors[n] for n in file_names}, str(dst / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in file_names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return dst


def test_sharded_checkpoint_loads_identically(checkpoint, llm, tmp_path):
    dst = shard(checkpoint[0], tmp_path / "sharded")
    # A stray weight file next to an index is not part of the checkpoint: the index wins.
    save_file({"junk.weight": torch.zeros(3)}, str(dst / "consolidated.safetensors"))
    sharded = LLM(str(dst), **ENGINE)
    ours, theirs = sharded.engine.model.state_dict(), llm.engine.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert greedy_ids(sharded) == greedy_ids(llm)


def test_index_naming_a_missing_shard(checkpoint, tmp_path):
    dst = shard(checkpoint[0], tmp_path / "sharded")
    (dst / "model-00002-of-00002.safetensors").unlink()
    msg = load_error(dst)
    assert "model-00002-of-00002.safetensors" in msg


def test_invalid_index(checkpoint, tmp_path):
    dst = shard(checkpoint[0], tmp_path / "sharded")
    (dst / INDEX_NAME).write_text('{"metadata": {}}')
    msg = load_error(dst)
    assert INDEX_NAME in msg


def test_shard_missing_tensor_named(checkpoint, tmp_path):
    dst = shard(checkpoint[0], tmp_path / "sharded")
    first = dst / "model-00001-of-00002.safetensors"
    with safe_open(str(first), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    dropped = min(tensors)
    del tensors[dropped]
    save_file(tensors, str(first))
    msg = load_error(dst)
    assert "missing" in msg
    # The loader names our parameter; for unfused tensors that is the checkpoint name.
    if not any(p in dropped for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
        assert dropped in msg


# ---- dropped groups --------------------------------------------------------------------------


def test_llama_does_not_drop_mtp_tensors(checkpoint, tmp_path):
    """Llama's LoadPlan drops only rotary buffers (and lm_head when tied): an `mtp.*` tensor in a
    Llama checkpoint is unexpected, not silently skipped."""
    tensors = read_tensors(checkpoint[0])
    tensors["mtp.layers.0.foo"] = torch.zeros(2)
    tensors["model.visual.blocks.0.x"] = torch.zeros(2)
    msg = load_error(variant(checkpoint[0], tmp_path / "ckpt", tensors))
    assert "unexpected" in msg and "mtp.layers.0.foo" in msg and "model.visual.blocks.0.x" in msg


def test_llama_drops_rotary_buffers_and_logs_them(checkpoint, tmp_path, caplog):
    tensors = read_tensors(checkpoint[0])
    tensors["model.rotary_emb.inv_freq"] = torch.ones(4)
    dst = variant(checkpoint[0], tmp_path / "ckpt", tensors)
    with caplog.at_level(logging.INFO, logger="fp4serve.models.weights"):
        llm = LLM(str(dst), **ENGINE)
    assert any("model.rotary_emb.*" in r.getMessage() and "dropped 1" in r.getMessage() for r in caplog.records)
    assert len(greedy_ids(llm)) == GREEDY.max_tokens


def test_tied_llama_drops_lm_head(tmp_path, caplog):
    path = tmp_path / "tied"
    path.mkdir()
    hf = make_checkpoint(path, tiny_llama_config(tied=True))
    tensors = read_tensors(path)
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = torch.full_like(embed, 1e3)  # a stale copy: must be ignored
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="fp4serve.models.weights"):
        llm = LLM(str(path), **ENGINE)
    assert any("lm_head.weight" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        expected = int(hf(torch.tensor([PROMPT["prompt_token_ids"]])).logits[0, -1].argmax())
    assert greedy_ids(llm)[0] == expected


def tiny_qwen3_5_state_dict():
    import transformers

    text = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "linear_num_key_heads": 2,
        "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "layer_types": ["linear_attention", "full_attention"],
    }  # fmt: skip
    config = transformers.Qwen3_5TextConfig(**text)
    torch.manual_seed(0)
    hf = transformers.Qwen3_5ForCausalLM(config)
    return config, {k: v.detach().clone() for k, v in hf.state_dict().items()}


def test_qwen3_5_drops_mtp_and_visual_groups(caplog):
    from fp4serve.models.qwen3_5 import Qwen3_5ForCausalLM

    config, tensors = tiny_qwen3_5_state_dict()
    extra = {name: torch.zeros(2) for name in ("mtp.layers.0.foo", "mtp.fc.weight", "model.visual.blocks.0.x")}
    model = Qwen3_5ForCausalLM(config, torch.float32)
    with caplog.at_level(logging.INFO, logger="fp4serve.models.weights"):
        model.load_weights(iter({**tensors, **extra}.items()))
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropped 2" in m and "mtp.*" in m for m in messages), messages
    assert any("dropped 1" in m and "model.visual.*" in m for m in messages), messages
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


def test_qwen3_5_keeps_mtp_when_a_drafter_wants_it():
    """With drop_mtp=False the MTP tensors are no longer dropped; this model has no MTP module
    to take them, so they are unexpected (never silently skipped)."""
    from fp4serve.models.qwen3_5 import Qwen3_5ForCausalLM

    config, tensors = tiny_qwen3_5_state_dict()
    model = Qwen3_5ForCausalLM(config, torch.float32, drop_mtp=False)
    with pytest.raises(CheckpointError, match=r"mtp\.layers\.0\.foo"):
        model.load_weights(iter({**tensors, "mtp.layers.0.foo": torch.zeros(2)}.items()))


# ---- config errors ---------------------------------------------------------------------------


def edit_config(src: Path, dst: Path, **changes) -> Path:
    dst = variant(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unknown_architecture(checkpoint, tmp_path):
    dst = edit_config(checkpoint[0], tmp_path / "ckpt", architectures=["FancyNewForCausalLM"])
    msg = load_error(dst, UnsupportedModelError)
    assert "FancyNewForCausalLM" in msg
    for supported in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3_5ForCausalLM"):
        assert supported in msg


def test_missing_architectures(checkpoint, tmp_path):
    dst = edit_config(checkpoint[0], tmp_path / "ckpt", architectures=None)
    msg = load_error(dst, UnsupportedModelError)
    assert "LlamaForCausalLM" in msg


@pytest.mark.parametrize(
    "quant, expected",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
        ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {}}, "format 'int-quantized'"),
        ({"quant_method": "modelopt", "quant_algo": "FP8"}, "quant_algo 'FP8' is not supported"),
    ],
)
def test_unsupported_quantization_is_refused_up_front(checkpoint, tmp_path, quant, expected):
    """Not a wall of 'unexpected weight_scale' names: one message saying what the checkpoint is."""
    dst = edit_config(checkpoint[0], tmp_path / "ckpt", quantization_config=quant)
    msg = load_error(dst, UnsupportedModelError)
    assert expected in msg


def test_model_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        LLM(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        LLM(str(tmp_path / "empty"))


def test_unknown_engine_argument(checkpoint):
    with pytest.raises(ConfigError, match="max_num_seq_s"):
        LLM(str(checkpoint[0]), max_num_seq_s=4, **ENGINE)


@pytest.mark.parametrize(
    "memory",
    [
        "lots", "12 parsecs", "", "-1GiB",
        "1.2.3GiB", ".",
    ],
)
def test_bad_kv_cache_memory_string(checkpoint, memory):
    with pytest.raises(ConfigError, match="cannot parse a size"):
        LLM(str(checkpoint[0]), dtype="float32", kv_cache_memory=memory)


def test_kv_cache_memory_units_parse(checkpoint):
    llm = LLM(str(checkpoint[0]), dtype="float32", kv_cache_memory="0.5 MiB")
    assert llm.engine.config.kv_cache_memory == 2**19
    assert llm.engine.capacity.num_tokens == 2**19 // llm.engine.capacity.kv_bytes_per_token // 16 * 16


@pytest.mark.parametrize("memory", ["100", "64KiB"])
def test_kv_cache_too_small_for_max_model_len(checkpoint, memory, monkeypatch):
    # 2 layers x K and V x 2 heads x 8 dims x 4 bytes = 256 bytes per token; 128 tokens need 32 KiB,
    # so 64 KiB holds 256 tokens: too small only against a longer max_model_len (past the model's
    # 128 positions, so allowed by vLLM's override variable).
    kwargs = {"dtype": "float32", "kv_cache_memory": memory}
    if memory == "64KiB":
        kwargs["max_model_len"] = 1024
        monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with pytest.raises(ConfigError, match="max_model_len") as info:
        LLM(str(checkpoint[0]), **kwargs)
    assert "--kv-cache-memory" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "float8"}, "--dtype"),
        ({"max_num_seqs": 0}, "--max-num-seqs"),
        ({"max_num_batched_tokens": 0}, "--max-num-batched-tokens"),
        ({"block_size": 0}, "--block-size"),
    ],
)
def test_bad_engine_values(checkpoint, kwargs, match):
    args = {**ENGINE, **kwargs}
    with pytest.raises(ConfigError, match=match):
        LLM(str(checkpoint[0]), **args)


def test_chunked_prefill_off_requires_budget_for_max_model_len(checkpoint):
    with pytest.raises(ConfigError, match="--max-num-batched-tokens"):
        LLM(str(checkpoint[0]), enable_chunked_prefill=False, max_num_batched_tokens=16, **ENGINE)


# ---- bad prompts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, match",
    [
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [1] * MAX_LEN}, "max_model_len"),
        ({"prompt_token_ids": [1] * (MAX_LEN + 50)}, "max_model_len"),
        ({"prompt_token_ids": [1, 2, VOCAB]}, "vocabulary"),
        ({"prompt_token_ids": [1, -1, 2]}, "vocabulary"),
        (12345, "prompt"),
    ],
    ids=["empty", "exactly-max-len", "too-long", "id-too-large", "negative-id", "not-a-prompt"],
)
def test_bad_prompt_leaves_engine_usable(llm, prompt, match):
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate([PROMPT, prompt], GREEDY)
    assert not engine.has_unfinished_requests(), "a failed call must leave nothing queued"
    assert engine.requests == {} and engine.detokenizers == {}
    assert engine.block_pool.num_free == engine.block_pool.num_blocks
    out = llm.generate(PROMPT, GREEDY)[0]
    assert out.finished and len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert engine.block_pool.num_free == engine.block_pool.num_blocks


def test_longest_valid_prompt_is_accepted(llm):
    out = llm.generate({"prompt_token_ids": [1] * (MAX_LEN - 1)}, SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.outputs[0].token_ids and out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 1, "prompt + output may not exceed max_model_len"


def test_bad_sampling_params_leave_engine_usable(llm):
    params = SamplingParams(max_tokens=4)
    params.temperature = -1.0  # bypass the constructor's check; add_request validates again
    with pytest.raises(InvalidRequestError, match="temperature"):
        llm.generate(PROMPT, params)
    assert not llm.engine.has_unfinished_requests()
    assert len(greedy_ids(llm)) == GREEDY.max_tokens
