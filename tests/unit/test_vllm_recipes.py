"""`vllm serve` recipes start as written with `fp4serve serve`, only the model path changed.

RECIPES are the serve lines of the model cards and container README fp4serve is built for, flag
for flag (copied here as data). Each goes through `fp4serve serve`'s parsing up to run_server, and
the EngineConfig it would get is checked, with the log line of every flag fp4serve accepts without
vLLM's effect; one recipe starts a real engine on a tiny Qwen3.5 with an MTP head."""

from __future__ import annotations

import json
import logging

import pytest
from spec_checkpoints import make_mtp_target

import fp4serve.server.app as app_module
from fp4serve import LLM, SamplingParams
from fp4serve.cli import main
from fp4serve.config import EngineConfig
from fp4serve.engine import engine as engine_module
from fp4serve.engine.memory import DEFAULT_KV_CACHE_MEMORY, device_memory, kv_cache_budget
from fp4serve.errors import ConfigError
from fp4serve.vllm_compat import vllm_flag_notes

MODEL = "MODEL"  # each recipe's model argument; the tests put a tiny checkpoint's path there
RECIPES = {
    "aeon-mtp-xs": [
        MODEL, "--quantization", "modelopt", "--trust-remote-code", "--max-model-len", "262144",
        "--max-num-seqs", "32", "--max-num-batched-tokens", "32768", "--gpu-memory-utilization", "0.94",
        "--enable-chunked-prefill", "--enable-prefix-caching", "--reasoning-parser", "qwen3",
        "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice",
        "--speculative-config", '{"method":"qwen3_5_mtp","num_speculative_tokens":3}',
    ],
    "a3b-dflash-quickstart": [
        MODEL, "--quantization", "compressed-tensors", "--attention-backend", "flash_attn",
        "--reasoning-parser", "qwen3", "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice",
        "--gpu-memory-utilization", "0.85", "--enable-chunked-prefill", "--enable-prefix-caching",
        "--trust-remote-code", "--max-model-len", "40960", "--max-num-seqs", "64",
        "--max-num-batched-tokens", "32768",
        "--speculative-config", '{"method":"dflash","model":"/drafter","num_speculative_tokens":11}',
    ],
    "a3b-dflash-compose": [
        MODEL, "--served-model-name", "qwen36-35b-heretic", "qwen36-fast", "qwen36-deep", "--host", "0.0.0.0",
        "--port", "8000", "--tensor-parallel-size", "1", "--dtype", "auto", "--quantization", "compressed-tensors",
        "--max-model-len", "262144", "--max-num-seqs", "64", "--max-num-batched-tokens", "32768",
        "--gpu-memory-utilization", "0.70", "--enable-chunked-prefill", "--enable-prefix-caching",
        "--trust-remote-code", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder",
        "--reasoning-parser", "qwen3",
        "--speculative-config", '{"method":"dflash","model":"/models/qwen36-dflash","num_speculative_tokens":11}',
        "--attention-backend", "flash_attn",
    ],
    "27b-dflash": [
        MODEL, "--quantization", "modelopt",
        "--speculative-config", '{"method": "dflash", "model": "z-lab/Qwen3.5-27B-DFlash", "num_speculative_tokens": 15}',
        "--attention-backend", "flash_attn", "--kv-cache-dtype", "auto", "--gpu-memory-utilization", "0.80",
        "--max-num-batched-tokens", "8192", "--max-num-seqs", "8", "--enable-chunked-prefill",
        "--enable-prefix-caching", "--trust-remote-code",
    ],
    "container-recipe-a": [
        MODEL, "--served-model-name", "aeon", "aeon-fast", "aeon-deep", "aeon-ultimate", "qwen36-ultimate",
        "aeon-ultimate-xs", "--dtype", "auto", "--quantization", "modelopt", "--kv-cache-dtype", "fp8_e4m3",
        "--attention-backend", "TRITON_ATTN", "--max-model-len", "229376", "--max-num-seqs", "16",
        "--max-num-batched-tokens", "32768", "--gpu-memory-utilization", "0.60", "--enable-chunked-prefill",
        "--enable-prefix-caching", "--generation-config", "vllm", "--reasoning-parser", "qwen3",
        "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice", "--mm-encoder-tp-mode", "data",
        "--speculative-config",
        '{"method":"dflash","model":"/drafter","num_speculative_tokens":12,"attention_backend":"TRITON_ATTN"}',
        "--trust-remote-code",
    ],
    "container-recipe-b": [
        MODEL, "--served-model-name", "aeon", "--quantization", "modelopt", "--kv-cache-dtype", "nvfp4",
        "--speculative-config", '{"method":"qwen3_5_mtp","num_speculative_tokens":3}',
        "--max-model-len", "32768", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.60",
        "--enable-chunked-prefill", "--enable-prefix-caching", "--trust-remote-code",
    ],
    # The README elides the rest of this line ("..."): these are the flags it shows.
    "container-recipe-c": [MODEL, "--quantization", "compressed-tensors", "--kv-cache-dtype", "fp8", "--max-num-seqs", "16"],
    "container-historical": [  # written "--quantization {compressed-tensors|modelopt}"
        MODEL, "--max-num-seqs", "8", "--max-model-len", "8192", "--gpu-memory-utilization", "0.78",
        "--enable-chunked-prefill", "--enable-prefix-caching", "--mamba-block-size", "256", "--quantization", "modelopt",
    ],
    "gemma-dflash": [
        MODEL, "--quantization", "compressed-tensors", "--trust-remote-code", "--attention-backend", "triton_attn",
        "--linear-backend", "flashinfer_cutlass", "--max-model-len", "184320", "--max-num-seqs", "32",
        "--max-num-batched-tokens", "32768", "--gpu-memory-utilization", "0.68", "--enable-chunked-prefill",
        "--enable-prefix-caching", "--enable-auto-tool-choice", "--tool-call-parser", "gemma4",
        "--reasoning-parser", "gemma4",
        "--speculative-config",
        '{"method":"dflash","model":"/drafter","num_speculative_tokens":10,"attention_backend":"flash_attn"}',
    ],
    "qwen36-27b-mtp": [
        MODEL, "--port", "8000", "--max-model-len", "65536",
        "--speculative-config", '{"method":"qwen3_5_mtp","num_speculative_tokens":1}',
        "--kv-cache-dtype", "fp8_e4m3", "--mamba-cache-mode", "align", "--trust-remote-code",
    ],
}  # fmt: skip
# Gemma 4 is not a model fp4serve serves, and it has no gemma4 reasoning or tool-call parser:
# that recipe is refused on those values (clearly, by name), never started with the wrong parsers.
REFUSED_RECIPES = {"gemma-dflash": "--tool-call-parser gemma4: fp4serve has no such tool-call parser"}
# The flags fp4serve takes without vLLM's effect, each logged by vllm_flag_notes.
NOTED_FLAGS = ("--attention-backend", "--linear-backend", "--moe-backend", "--mm-encoder-tp-mode")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "target"
    make_mtp_target(path, max_position_embeddings=262144)  # Qwen3.5's own, so the recipes' lengths fit
    return path


@pytest.fixture
def served(monkeypatch):
    """Run `fp4serve serve ...` up to run_server and capture what it was given."""
    calls = []
    monkeypatch.setattr(app_module, "run_server", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def serve(recipe: str, model, served) -> tuple[EngineConfig, dict]:
    argv = [str(model) if arg == MODEL else arg for arg in RECIPES[recipe]]
    main(["serve", *argv])
    [(args, kwargs)] = served
    return args[0], kwargs


def flag_value(recipe: str, flag: str) -> str | None:
    argv = RECIPES[recipe]
    return argv[argv.index(flag) + 1] if flag in argv else None


def expected_notes(recipe: str) -> list[str]:
    """The start of each log line the recipe's accepted-but-not-applicable flags must give."""
    noted = [f"{flag} {flag_value(recipe, flag)}:" for flag in NOTED_FLAGS if flag in RECIPES[recipe]]
    spec = json.loads(flag_value(recipe, "--speculative-config") or "{}")
    if "attention_backend" in spec:
        noted.insert(1 if "--attention-backend" in RECIPES[recipe] else 0,
                     f"--speculative-config attention_backend {spec['attention_backend']}:")  # fmt: skip
    return noted


@pytest.mark.parametrize("recipe", [name for name in RECIPES if name not in REFUSED_RECIPES])
def test_recipe_starts_as_written(recipe, target, served):
    config, kwargs = serve(recipe, target, served)
    assert config.model == str(target)
    # vLLM's meanings fp4serve keeps
    for flag, field in [("--max-model-len", "max_model_len"), ("--max-num-seqs", "max_num_seqs"),
                        ("--max-num-batched-tokens", "max_num_batched_tokens"), ("--mamba-block-size", "mamba_block_size")]:  # fmt: skip
        if flag in RECIPES[recipe]:
            assert getattr(config, field) == int(flag_value(recipe, flag))
    for flag, field in [("--quantization", "quantization"), ("--kv-cache-dtype", "kv_cache_dtype"),
                        ("--generation-config", "generation_config"), ("--mamba-cache-mode", "mamba_cache_mode")]:  # fmt: skip
        if flag in RECIPES[recipe]:
            assert getattr(config, field) == flag_value(recipe, flag)
    fraction = flag_value(recipe, "--gpu-memory-utilization")
    assert config.gpu_memory_utilization == (float(fraction) if fraction else None)
    assert config.kv_cache_memory is None  # so the fraction sizes the cache
    assert config.tensor_parallel_size == 1
    spec = flag_value(recipe, "--speculative-config")
    assert config.speculative_config == (json.loads(spec) if spec else None)
    if "--served-model-name" in RECIPES[recipe]:
        assert kwargs["served_model_names"][0] == flag_value(recipe, "--served-model-name")
    if "--reasoning-parser" in RECIPES[recipe]:
        assert kwargs["options"].reasoning_parser == "qwen3" and kwargs["options"].tool_call_parser == "qwen3_coder"
    # one log line for each flag fp4serve accepts without vLLM's effect, saying so
    notes = vllm_flag_notes(config)
    assert [note[: len(start)] for note, start in zip(notes, expected_notes(recipe))] == expected_notes(recipe)
    assert len(notes) == len(expected_notes(recipe))


@pytest.mark.parametrize("recipe", list(REFUSED_RECIPES))
def test_recipe_fp4serve_cannot_serve_is_refused_by_name(recipe, target, served, capsys):
    argv = [str(target) if arg == MODEL else arg for arg in RECIPES[recipe]]
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    assert exit_info.value.code == 2 and REFUSED_RECIPES[recipe] in capsys.readouterr().err
    assert not served


def test_a_recipe_serves_on_a_real_engine(target, served, caplog):
    """qwen36-27b-mtp as written (MTP drafting, fp8 KV, --mamba-cache-mode align) on a tiny Qwen3.5."""
    caplog.set_level(logging.INFO)
    config, _ = serve("qwen36-27b-mtp", target, served)
    llm = LLM.from_config(config)
    [output] = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=6))
    assert len(output.outputs[0].token_ids) == 6
    assert llm.engine.spec_config.method == "mtp" and llm.engine.kv_format.name.startswith("fp8")
    assert "prefix caching on a hybrid model:" in caplog.text and "--mamba-cache-mode align" in caplog.text
    assert llm.engine.block_pool.enable_prefix_caching and llm.engine.block_pool.snapshots.capacity > 0


def test_gpu_memory_utilization_sizes_the_cache_from_available_ram(target, caplog, monkeypatch):
    """On CPU: the fraction of available RAM less the weights, then capped at what --max-num-seqs x
    --max-model-len can fill, as with --kv-cache-memory."""
    caplog.set_level(logging.INFO)
    read = []  # what the engine read of the device's memory

    def recorded_device_memory(device):
        read.append(device_memory(device))
        return read[-1]

    monkeypatch.setattr(engine_module, "device_memory", recorded_device_memory)
    llm = LLM(str(target), dtype="float32", max_model_len=256, max_num_seqs=2, gpu_memory_utilization=0.5)
    engine = llm.engine
    assert "--gpu-memory-utilization 0.5:" in caplog.text and "x available RAM" in caplog.text
    [(ram, _)] = read
    assert 0 < engine.kv_cache_memory < 0.5 * ram  # less the weights
    assert engine.capacity.num_tokens <= 2 * (256 + 16 + 16)  # the cap, not the budget, sizes it
    [output] = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))
    assert len(output.outputs[0].token_ids) == 3


def test_kv_cache_budget_combines_the_two_flags(caplog):
    caplog.set_level(logging.INFO)
    ram = (10 * 2**30, "available RAM")
    assert kv_cache_budget(EngineConfig(), ram, 2**30) == DEFAULT_KV_CACHE_MEMORY
    assert kv_cache_budget(EngineConfig(gpu_memory_utilization=0.5), ram, 2**30) == 4 * 2**30
    # an explicit size wins, as vLLM's --kv-cache-memory-bytes does, and the log says so
    assert kv_cache_budget(EngineConfig(gpu_memory_utilization=0.5, kv_cache_memory="1GiB"), ram, 2**30) == 2**30
    assert "--gpu-memory-utilization 0.5 does not" in caplog.text
    with pytest.raises(ConfigError, match="leaves no memory for the KV cache"):
        kv_cache_budget(EngineConfig(gpu_memory_utilization=0.05), ram, 2**30)
    for fraction in (0, 1.5):
        with pytest.raises(ConfigError, match=r"give a fraction in \(0, 1\]"):
            EngineConfig(gpu_memory_utilization=fraction)


def test_tensor_parallel_beyond_one_device_is_refused(served, capsys):
    main(["serve", "-tp", "1"])  # vLLM's default, so accepted
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--tensor-parallel-size", "2"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--tensor-parallel-size 2: fp4serve runs the model on one device" in error
    assert "across 2 GPUs" in error
    assert len(served) == 1


def test_every_flag_it_cannot_take_is_named_in_one_message(served, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--swap-space", "4", "--no-such-flag", "x", "--gpu-memory-utilization", "0.9",
              "--cpu-offload-gb=2", "--another-one"])  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unrecognized arguments" not in error
    assert error.splitlines()[1:] == [
        "  --swap-space: fp4serve does not support this vLLM flag yet (preempted requests are recomputed, never swapped)",
        "  --cpu-offload-gb: fp4serve does not support this vLLM flag yet (weights are not offloaded)",
        "  --no-such-flag: fp4serve does not support vLLM's --no-such-flag (unknown flag; see --help)",
        "  --another-one: fp4serve does not support vLLM's --another-one (unknown flag; see --help)",
    ]
    assert not served
