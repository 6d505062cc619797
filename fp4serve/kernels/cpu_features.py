"""What the CPU can do, read once, and the instruction-set level every CPU fast path is chosen from.

Levels, lowest first (a level needs every flag of the ones below it):

x86_64   scalar       portable C (the compiler's baseline x86-64 code)
         avx2         AVX2 + FMA + F16C (Haswell / Zen 1 and later)
         avx512       AVX-512 F, BW, VL, DQ (Skylake-SP, Zen 4)
         avx512_bf16  + AVX512-BF16 (`vdpbf16ps`: bf16 dot products in hardware; Cooper Lake, Zen 4)
         amx          + AMX-BF16 tiles (Sapphire Rapids); fp4serve's own kernels use avx512_bf16 code
aarch64  scalar       portable C (NEON is part of the aarch64 baseline, so the compiler vectorizes it)
         neon         Advanced SIMD (asimd)
         neon_bf16    + the BF16 extension (Graviton 3, Apple M2 and later)

`FP4SERVE_CPU_ISA=<level>` lowers the level (never raises it: code for a missing instruction set
would crash), so a machine tests every path below its own. The bf16 decision follows the level:
bf16 matrix math is native only at avx512_bf16, amx or neon_bf16; below that torch's bf16 matmul
converts element by element and runs hundreds of times slower than fp32 (measured on AVX2 Zen 2:
0.3 vs 142 GFLOP/s), and oneDNN refuses to pre-pack bf16 weights without AVX-512 BW/VL/DQ.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from fp4serve.errors import ConfigError

ENV_VAR = "FP4SERVE_CPU_ISA"

LEVELS = {
    "x86_64": ("scalar", "avx2", "avx512", "avx512_bf16", "amx"),
    "aarch64": ("scalar", "neon", "neon_bf16"),
}
# /proc/cpuinfo flags each level adds (x86 "flags", aarch64 "Features").
REQUIRED = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_bf16", "amx_tile"),
    "neon": ("asimd",),
    "neon_bf16": ("bf16",),
}
# Flags named in the start log, as people know them.
REPORTED = {
    "x86_64": (
        ("avx2", "AVX2"),
        ("fma", "FMA"),
        ("avx512f", "AVX512F"),
        ("avx512bw", "BW"),
        ("avx512vl", "VL"),
        ("avx512dq", "DQ"),
        ("avx512_bf16", "AVX512-BF16"),
        ("avx_ne_convert", "AVX-NE-CONVERT"),
        ("amx_bf16", "AMX-BF16"),
    ),
    "aarch64": (("asimd", "NEON"), ("sve", "SVE"), ("bf16", "BF16"), ("i8mm", "I8MM")),
}


def _machine_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@dataclass(frozen=True)
class CPUFeatures:
    arch: str  # x86_64 | aarch64 | another platform.machine() (then only the scalar level exists)
    flags: frozenset[str]
    detected: str  # the highest level the flags allow
    level: str  # the level fast paths use: `detected`, or lower when FP4SERVE_CPU_ISA asks

    @property
    def forced(self) -> bool:
        return self.level != self.detected

    def at_least(self, level: str) -> bool:
        """Whether paths of `level` may run (False for a level of another architecture)."""
        order = LEVELS.get(self.arch, ("scalar",))
        return level in order and order.index(self.level) >= order.index(level)

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix math in hardware, so bf16 is a fast compute dtype here."""
        return self.at_least("avx512_bf16") or self.at_least("neon_bf16")

    @property
    def onednn_bf16_packing(self) -> bool:
        """oneDNN reorders bf16 weights into its blocked layout only with AVX-512 BW/VL/DQ or
        AVX-NE-CONVERT (torch raises otherwise); on aarch64 torch does not offer it."""
        if self.arch != "x86_64":
            return False
        return self.at_least("avx512") or (self.at_least("avx2") and "avx_ne_convert" in self.flags)

    @property
    def c_kernel_level(self) -> str:
        """The build of fp4serve's C kernels this level runs: AMX machines run the avx512_bf16 code
        (no AMX tiles in them); aarch64 runs the portable C, which the compiler vectorizes with
        NEON (part of the aarch64 baseline)."""
        return next((level for level in ("avx512_bf16", "avx512", "avx2") if self.at_least(level)), "scalar")

    def describe(self) -> str:
        """One line for the start log: the flags, the level and the paths it selects."""
        names = [label for flag, label in REPORTED.get(self.arch, ()) if flag in self.flags]
        level = self.level + (f" (forced by {ENV_VAR}; the CPU allows {self.detected})" if self.forced else "")
        return (
            f"CPU {self.arch} [{' '.join(names) or 'no SIMD flags read'}], level {level}: C kernels {self.c_kernel_level}, "
            f"bf16 matmul {'native' if self.native_bf16 else 'emulated'}, "
            f"oneDNN bf16 weight packing {'on' if self.onednn_bf16_packing else 'off'}"
        )


def _read_flags() -> frozenset[str]:
    """x86 'flags' or aarch64 'Features' of the first processor in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def detect(arch: str, flags: frozenset[str], forced: str | None) -> CPUFeatures:
    """The level the flags allow, lowered to `forced` when given (a name of this architecture's
    levels; asking for more than the CPU has is an error naming both)."""
    order = LEVELS.get(arch, ("scalar",))
    detected = "scalar"
    for level in order[1:]:
        if not set(REQUIRED[level]) <= flags:
            break
        detected = level
    level = detected
    if forced:
        forced = forced.strip().lower()
        if forced not in order:
            raise ConfigError(f"{ENV_VAR}={forced!r}: choose one of {', '.join(order)} on {arch}")
        if order.index(forced) > order.index(detected):
            raise ConfigError(
                f"{ENV_VAR}={forced} needs CPU flags this machine lacks ({arch}, highest level {detected}); "
                f"it can only lower the level"
            )
        level = forced
    return CPUFeatures(arch, flags, detected, level)


@functools.cache
def cpu_features() -> CPUFeatures:
    """This machine's features and level; read once per process."""
    return detect(_machine_arch(), _read_flags(), os.environ.get(ENV_VAR) or None)
