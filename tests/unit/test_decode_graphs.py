"""The capture sizes of decode graphs (the replay itself: tests/triton/test_engine_triton.py)."""
from __future__ import annotations

import pytest
import torch

from fp4serve.engine.decode_graphs import default_sizes, graphs_unsupported, parse_sizes
from fp4serve.errors import ConfigError


def test_default_sizes_follow_vllm_and_cover_max_num_seqs():
    assert default_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_sizes(3) == [1, 2, 4]
    assert default_sizes(1) == [1]
    assert default_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert default_sizes(1000)[-1] == 256


def test_parse_sizes():
    assert parse_sizes("8, 1,2,2", 64) == [1, 2, 8]
    assert parse_sizes(None, 8) == [1, 2, 4, 8]
    for bad in ("1,x", "0,2", ","):
        with pytest.raises(ConfigError, match="--cuda-graph-sizes"):
            parse_sizes(bad, 8)


def test_models_that_read_the_host_run_eagerly(monkeypatch):
    """MoE routing and W4A4 activation checks read values on the host: never captured (on CPU the
    replay stand-in asks the same questions a GPU would)."""
    from fp4serve.formats.checkpoint import ON_THE_FLY
    from fp4serve.layers.moe import SparseMoeBlock
    from fp4serve.layers.nvfp4_linear import NVFP4LinearMethod

    monkeypatch.setenv("FP4SERVE_CPU_GRAPH_REPLAY", "1")
    monkeypatch.setenv("FP4SERVE_TRITON", "1")
    w4a4 = torch.nn.Module()
    w4a4.method = NVFP4LinearMethod(ON_THE_FLY, compute="w4a4")
    assert graphs_unsupported(torch.nn.Sequential(w4a4), torch.device("cpu")) == (
        "--nvfp4-compute w4a4 checks the activations' scales on the host"
    )
    moe = SparseMoeBlock(16, 2, 1, 16, 16, True, torch.float32, "mlp")
    assert graphs_unsupported(moe, torch.device("cpu")) == "MoE routing counts each expert's tokens on the host"
    w4a4.method = NVFP4LinearMethod(ON_THE_FLY, compute="w4a16")
    assert graphs_unsupported(torch.nn.Sequential(w4a4), torch.device("cpu")) is None


def test_cpu_has_no_graphs(monkeypatch):
    monkeypatch.delenv("FP4SERVE_CPU_GRAPH_REPLAY", raising=False)
    assert graphs_unsupported(torch.nn.Linear(2, 2), torch.device("cpu")) == "cpu has no CUDA graphs"
