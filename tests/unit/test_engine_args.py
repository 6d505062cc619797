"""Engine flags come from EngineConfig's fields: vLLM's names, aliases and choices stay as users type
them, every command that loads an engine has all of them with EngineConfig's defaults, and LLM(...)
refuses names that are not engine arguments."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

import fp4serve.bench.cli
from fp4serve import LLM
from fp4serve.cli import build_parser
from fp4serve.config import EngineConfig
from fp4serve.engine_args import add_engine_args, engine_config
from fp4serve.errors import ConfigError

# Option strings and choices of each engine argument, in --help order (None: any value).
ENGINE_FLAGS = [
    (["model"], None),
    (["--revision"], None),
    (["--tokenizer"], None),
    (["--tokenizer-revision"], None),
    (["--skip-tokenizer-init"], None),
    (["--dtype"], ["auto", "bfloat16", "float16", "half", "float32", "float"]),
    (["--device"], None),
    (["--max-model-len"], None),
    (["--max-num-seqs"], None),
    (["--max-num-batched-tokens"], None),
    (["--block-size"], None),
    (["--kv-cache-memory"], None),
    (["--enable-prefix-caching", "--no-enable-prefix-caching"], None),
    (["--enable-chunked-prefill", "--no-enable-chunked-prefill"], None),
    (["--seed"], None),
    (["--generation-config"], ["auto", "vllm"]),
    (["--chat-template"], None),
    (["--language-model-only"], None),
    (["--limit-mm-per-prompt"], None),
    (["--trust-remote-code"], None),
    (["--num-threads"], None),
    (["--quantization", "-q"], ["modelopt", "compressed-tensors", "nvfp4"]),
    (["--nvfp4-lm-head"], None),
    (["--nvfp4-compute"], ["auto", "w4a16", "w4a4"]),
    (["--kv-cache-dtype"], ["auto", "bfloat16", "fp8", "fp8_e4m3", "nvfp4"]),
    (["--calculate-kv-scales"], None),
    (["--enforce-eager"], None),
    (["--cuda-graph-sizes"], None),
    (["--speculative-config"], None),
    (["--gpu-memory-utilization"], None),
    (["--tensor-parallel-size", "-tp"], None),
    (["--attention-backend"], None),
    (["--linear-backend"], None),
    (["--moe-backend"], None),
    (["--mm-encoder-tp-mode"], None),
    (["--mamba-cache-mode"], ["none", "all", "align"]),
    (["--mamba-block-size"], None),
    (["--gdn-snapshot-fraction"], None),
]


def test_engine_flags_keep_their_names_and_choices():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    actions = [a for a in parser._actions if a.dest != "help"]
    assert [(a.option_strings or [a.dest], a.choices) for a in actions] == ENGINE_FLAGS
    assert [a.dest for a in actions] == [f.name for f in dataclasses.fields(EngineConfig)]


@pytest.mark.parametrize("command", [["serve"], ["generate"], ["chat"], ["bench", "offline"]])
def test_every_engine_command_defaults_to_engine_config(command):
    assert engine_config(build_parser().parse_args(command)) == EngineConfig()


def test_flags_reach_engine_config():
    args = build_parser().parse_args(
        ["generate", "some/dir", "-q", "nvfp4", "--no-enable-prefix-caching", "--max-num-seqs", "3",
         "--max-model-len", "512", "--kv-cache-memory", "1MiB", "--nvfp4-lm-head",
         "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']
    )  # fmt: skip
    config = engine_config(args)
    assert (config.model, config.quantization, config.enable_prefix_caching) == ("some/dir", "nvfp4", False)
    assert (config.max_num_seqs, config.max_model_len, config.kv_cache_memory) == (3, 512, 2**20)
    assert config.nvfp4_lm_head and config.enable_chunked_prefill
    assert config.speculative_config == {"method": "ngram", "num_speculative_tokens": 2}


def test_llm_refuses_unknown_engine_arguments():
    with pytest.raises(ConfigError, match=r"unknown engine arguments: \['max_num_seq'\]"):
        LLM(max_num_seq=3)  # refused before any model loads


def test_bench_cli_does_not_import_the_top_level_cli():
    # fp4serve.cli imports fp4serve.bench.cli; importing back would make a cycle.
    tree = ast.parse(Path(fp4serve.bench.cli.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "fp4serve.engine_args" in imported and "fp4serve.cli" not in imported
