"""FP4SERVE_TRITON: which tensors take the Triton kernels, chosen from what the machine has."""
from __future__ import annotations

import pytest
import torch

from fp4serve.errors import ConfigError
from fp4serve.kernels import triton_support
from fp4serve.kernels.triton_support import triton_reason, use_triton

CPU = torch.device("cpu")


def test_cpu_keeps_its_own_kernels_unless_forced(monkeypatch):
    monkeypatch.delenv("FP4SERVE_TRITON", raising=False)
    assert triton_reason(CPU) == (False, "cpu tensors take the CPU kernels")
    assert not use_triton(torch.zeros(1))
    monkeypatch.setenv("FP4SERVE_TRITON", "0")
    assert triton_reason(CPU) == (False, "FP4SERVE_TRITON=0")


def test_forcing_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_support, "triton_importable", lambda: True)
    monkeypatch.setenv("FP4SERVE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_reason(CPU) == (True, "Triton interpreter (TRITON_INTERPRET=1)")
    assert use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="needs TRITON_INTERPRET=1"):
        triton_reason(CPU)


def test_forcing_without_triton_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setattr(triton_support, "triton_importable", lambda: False)
    monkeypatch.setenv("FP4SERVE_TRITON", "1")
    with pytest.raises(ConfigError, match="triton is not installed"):
        triton_reason(CPU)
    monkeypatch.setenv("FP4SERVE_TRITON", "auto")
    assert triton_reason(CPU) == (False, "triton is not installed")
    monkeypatch.setenv("FP4SERVE_TRITON", "yes")
    with pytest.raises(ConfigError, match="expected auto, 0 or 1"):
        triton_reason(CPU)


def test_old_gpus_keep_the_torch_path(monkeypatch):
    monkeypatch.setattr(triton_support, "triton_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.delenv("FP4SERVE_TRITON", raising=False)
    assert triton_reason(torch.device("cuda", 0)) == (False, "sm75 is older than sm80")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert triton_reason(torch.device("cuda", 0)) == (True, "sm90")
