"""CPU capability detection (kernels/cpu_features.py) and the choices made from it: the level,
FP4SERVE_CPU_ISA, the CPU compute dtype, oneDNN bf16 packing, and the start log."""
from __future__ import annotations

import logging

import pytest
import torch

from fp4serve.config import choose_dtype
from fp4serve.errors import ConfigError
from fp4serve.kernels.cpu_features import cpu_features, detect

# /proc/cpuinfo flags of real machines (trimmed to the ones that matter plus some noise).
ZEN2 = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni".split())
ZEN4 = ZEN2 | frozenset("avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni gfni".split())
SKYLAKE_SP = ZEN2 | frozenset("avx512f avx512dq avx512bw avx512vl avx512cd".split())
SAPPHIRE_RAPIDS = ZEN4 | frozenset("amx_bf16 amx_tile amx_int8 avx512_fp16".split())
ALDER_LAKE = ZEN2 | frozenset("avx_vnni".split())  # no AVX-512
ARROW_LAKE = ALDER_LAKE | frozenset("avx_ne_convert avx_vnni_int8".split())
GRAVITON2 = frozenset("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp".split())
GRAVITON3 = GRAVITON2 | frozenset("sve bf16 i8mm svebf16".split())
ALL_FP = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize(
    "arch,flags,level,native_bf16,packing",
    [
        ("x86_64", frozenset({"sse2"}), "scalar", False, False),
        ("x86_64", ZEN2, "avx2", False, False),
        ("x86_64", ALDER_LAKE, "avx2", False, False),
        ("x86_64", ARROW_LAKE, "avx2", False, True),
        ("x86_64", SKYLAKE_SP, "avx512", False, True),
        ("x86_64", ZEN4, "avx512_bf16", True, True),
        ("x86_64", SAPPHIRE_RAPIDS, "amx", True, True),
        ("aarch64", GRAVITON2, "neon", False, False),
        ("aarch64", GRAVITON3, "neon_bf16", True, False),
        ("riscv64", frozenset({"rv64imafdc"}), "scalar", False, False),
    ],
)
def test_levels_from_real_flag_sets(arch, flags, level, native_bf16, packing):
    cpu = detect(arch, flags, None)
    assert (cpu.level, cpu.detected, cpu.forced) == (level, level, False)
    assert cpu.native_bf16 is native_bf16
    assert cpu.onednn_bf16_packing is packing


def test_a_level_needs_every_flag_below_it():
    # avx512_bf16 without AVX2/FMA (a hypervisor that hides flags) is not avx512_bf16
    odd = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
    assert detect("x86_64", odd, None).level == "scalar"
    assert detect("x86_64", SKYLAKE_SP - {"avx512vl"}, None).level == "avx2"


def test_forcing_lowers_the_level_and_every_choice_follows():
    cpu = detect("x86_64", SAPPHIRE_RAPIDS, "avx2")
    assert (cpu.level, cpu.detected, cpu.forced) == ("avx2", "amx", True)
    assert not cpu.native_bf16 and not cpu.onednn_bf16_packing and cpu.c_kernel_level == "avx2"
    assert not cpu.at_least("avx512") and cpu.at_least("avx2") and cpu.at_least("scalar")
    assert "forced by FP4SERVE_CPU_ISA" in cpu.describe() and "allows amx" in cpu.describe()
    scalar = detect("x86_64", ZEN4, " Scalar ")
    assert scalar.c_kernel_level == "scalar" and not scalar.native_bf16
    assert detect("aarch64", GRAVITON3, "neon").native_bf16 is False


@pytest.mark.parametrize(
    "forced,message",
    [("avx512", "needs CPU flags this machine lacks"), ("sse9", "choose one of scalar, avx2"), ("neon", "choose one of")],
)
def test_forcing_errors_name_the_problem(forced, message):
    with pytest.raises(ConfigError, match=message):
        detect("x86_64", ZEN2, forced)


def test_c_kernel_levels():
    assert detect("x86_64", SAPPHIRE_RAPIDS, None).c_kernel_level == "avx512_bf16"  # no AMX code of ours
    assert detect("x86_64", SKYLAKE_SP, None).c_kernel_level == "avx512"
    assert detect("x86_64", ZEN2, None).c_kernel_level == "avx2"
    assert detect("aarch64", GRAVITON3, None).c_kernel_level == "scalar"  # portable C, NEON-vectorized


def test_this_machine_is_read_and_the_environment_lowers_it(monkeypatch):
    here = cpu_features()
    assert here.level == here.detected or here.forced
    assert "level " + here.level in here.describe()
    monkeypatch.setenv("FP4SERVE_CPU_ISA", "scalar")
    cpu_features.cache_clear()
    try:
        assert cpu_features().level == "scalar" and cpu_features().c_kernel_level == "scalar"
    finally:
        monkeypatch.undo()
        cpu_features.cache_clear()


def test_auto_dtype_on_cpu_is_native(caplog):
    cpu = torch.device("cpu")
    for stored in (torch.float32, torch.bfloat16, torch.float16, None):
        dtype, why = choose_dtype("auto", stored, cpu, detect("x86_64", ZEN2, None))
        assert dtype == torch.float32 and "no bf16 dot products" in why
        dtype, why = choose_dtype("auto", stored, cpu, detect("x86_64", ZEN4, None))
        assert dtype == torch.bfloat16 and "in hardware" in why
    assert choose_dtype("auto", torch.bfloat16, cpu, detect("aarch64", GRAVITON3, None))[0] == torch.bfloat16
    assert choose_dtype("auto", torch.bfloat16, cpu, detect("aarch64", GRAVITON2, None))[0] == torch.float32
    # CUDA keeps vLLM's rule: half types as stored, fp32 checkpoints in bf16
    assert choose_dtype("auto", torch.float16, torch.device("cuda"))[0] == torch.float16
    assert choose_dtype("auto", torch.float32, torch.device("cuda"))[0] == torch.bfloat16


def test_explicit_bf16_on_an_avx2_cpu_runs_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fp4serve.config"):
        dtype, why = choose_dtype("bfloat16", torch.bfloat16, torch.device("cpu"), detect("x86_64", ZEN2, None))
    assert dtype == torch.bfloat16 and why == "--dtype"
    assert "emulates bf16 matmuls" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fp4serve.config"):
        choose_dtype("bfloat16", torch.bfloat16, torch.device("cpu"), detect("x86_64", ZEN4, None))
    assert caplog.text == ""
