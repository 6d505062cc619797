"""Whether a tensor's work goes through the Triton kernels, decided from what the machine has.

`FP4SERVE_TRITON`:
  auto (default)  CUDA tensors on a GPU of compute capability 8.0 or later (bf16 tensor cores), with
                  triton importable; everything else takes the torch/C paths.
  0               never: CUDA runs the plain torch references (layers/), as before the kernels.
  1               always, CPU tensors too: only under Triton's interpreter (`TRITON_INTERPRET=1`,
                  set before triton is imported), which runs the kernels in numpy. This is how CI,
                  which has no GPU, runs every kernel and the engine on them.

Never tried and left to fail: a machine without triton, or a GPU older than sm80, simply keeps
the torch path (`reason` says why, for the start log).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from fp4serve.errors import ConfigError

ENV_VAR = "FP4SERVE_TRITON"
MIN_CAPABILITY = (8, 0)


def interpreting() -> bool:
    """Triton's interpreter is on: kernels run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto")
    if mode not in ("auto", "0", "1"):
        raise ConfigError(f"{ENV_VAR}={mode!r}: expected auto, 0 or 1")
    return mode


def triton_reason(device: torch.device) -> tuple[bool, str]:
    """(use the Triton kernels for tensors on `device`?, why), checked once per engine start."""
    mode = _mode()
    if mode == "0":
        return False, f"{ENV_VAR}=0"
    if not triton_importable():
        if mode == "1":
            raise ConfigError(f"{ENV_VAR}=1 but triton is not installed (pip install 'fp4serve[cuda]')")
        return False, "triton is not installed"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            if mode == "1":
                raise ConfigError(f"{ENV_VAR}=1 but the GPU is sm{capability[0]}{capability[1]}; the kernels need sm80+")
            return False, f"sm{capability[0]}{capability[1]} is older than sm80"
        return True, f"sm{capability[0]}{capability[1]}"
    if mode == "1":
        if not interpreting():
            raise ConfigError(f"{ENV_VAR}=1 on {device.type} needs TRITON_INTERPRET=1 (Triton's CPU interpreter)")
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    return False, f"{device.type} tensors take the CPU kernels"


def use_triton(t: torch.Tensor) -> bool:
    """The per-call test the layers make: cheap (cached per device)."""
    return _use_triton_on(t.device.type, t.device.index, _mode(), interpreting())


@functools.cache
def _use_triton_on(device_type: str, index: int | None, mode: str, interpret: bool) -> bool:
    return triton_reason(torch.device(device_type, index) if index is not None else torch.device(device_type))[0]


def sm_count(device: torch.device, interpreted: int) -> int:
    """The GPU's streaming multiprocessors (kernels size split grids from it); under the interpreter,
    which has none, the nominal `interpreted` count the caller plans its test grids for."""
    if device.type != "cuda":
        return interpreted
    return _cuda_sm_count(device)


@functools.cache
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def emulate_bf16() -> bool:
    """The interpreter computes in numpy, which has no bfloat16: it casts fp32 -> bf16 by truncation
    and its bf16 dot products are wrong. Kernels then keep bf16 operands in fp32, rounded to bf16
    values by `round_to_bf16` (exact round-half-to-even), which is what a GPU's bf16 cast does."""
    return interpreting()
