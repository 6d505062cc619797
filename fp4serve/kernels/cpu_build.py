"""Builds fp4serve's C kernels (cpu_nvfp4.c, cpu_decode.c) into one library per CPU level.

Compiled on first use with the system C compiler and cached under $FP4SERVE_CACHE/kernels, with
explicit instruction-set flags rather than -march=native: a library then runs on every CPU of its
level, and the levels below a machine's own are built and tested on it (cpu_features.py says which
level this CPU runs; FP4SERVE_CPU_ISA lowers it)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from fp4serve.cache_dir import cache_dir
from fp4serve.kernels.cpu_features import cpu_features

log = logging.getLogger(__name__)

SOURCES = ("cpu_nvfp4.c", "cpu_decode.c")  # cpu_decode.c includes cpu_nvfp4.c: compile it alone
MAIN_SOURCE = "cpu_decode.c"
BASE_CFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = _AVX2 + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
LEVEL_CFLAGS = {"scalar": (), "avx2": _AVX2, "avx512": _AVX512, "avx512_bf16": _AVX512 + ("-mavx512bf16",)}


def kernel_cflags(level: str) -> tuple[str, ...]:
    return BASE_CFLAGS + LEVEL_CFLAGS[level]


def build_library(cflags: tuple[str, ...], cache: Path | None = None) -> ctypes.CDLL:
    """Compile the kernels (once per sources, compiler and flags; cached) and load them."""
    sources = {name: (Path(__file__).parent / name).read_text() for name in SOURCES}
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join((*sources.values(), compiler, *cflags)).encode()).hexdigest()[:16]
    directory = (cache or cache_dir()) / "kernels"
    library = directory / f"fp4serve_cpu_{key}.so"
    if not library.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            for name, text in sources.items():
                (Path(tmp) / name).write_text(text)
            built = Path(tmp) / library.name
            command = [compiler, *cflags, str(Path(tmp) / MAIN_SOURCE), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise OSError(f"{compiler} failed: {result.stderr.strip()[:500]}")
            os.replace(built, library)  # atomic: a concurrent process sees the old state or the whole file
        log.info("compiled the CPU kernels: %s", library)
    lib = ctypes.CDLL(str(library))
    _declare(lib)
    lib.bf16_dot = bool(lib.nvfp4_bf16_dot())
    lib.isa = lib.nvfp4_kernel_isa().decode() + ("_bf16" if lib.bf16_dot else "")
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures, once per library (pointers are data_ptr() ints)."""
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "nvfp4_gemv": ([p, p, p, p, i64, p, i32, p, i64, i64, i64, i32, i32], ctypes.c_int),
        "nvfp4_dequantize": ([p, p, p, p, i64, p, i64, i64, i32, i32], None),
        "nvfp4_kernel_isa": ([], ctypes.c_char_p),
        "nvfp4_bf16_dot": ([], ctypes.c_int),
        "llama_decode": ([p, p, p, i64, p, p, i64, p, p, p, p, i64, i32], ctypes.c_int),
        "decode_scratch_floats": ([p, i64, i64, i64], ctypes.c_int64),
        "paged_decode_attention": ([p, p, p, i32, p, i64, p, i64, i64, i64, i64, i64, f32, i64, p, i32], ctypes.c_int),
        "release_openmp_threads": ([], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype


@functools.cache
def cpu_library() -> ctypes.CDLL | None:
    """The library for this CPU's level, built once per process; None without a working C
    compiler (then every caller runs its torch path)."""
    try:
        return build_library(kernel_cflags(cpu_features().c_kernel_level))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable (%s); using the slower torch paths", e)
        return None


def release_openmp_threads() -> bool:
    """Let the calling thread's OpenMP workers go, before another thread takes over the compute
    (cpu_decode.c release_openmp_threads says why). True when they were released."""
    lib = cpu_library()
    return lib is not None and lib.release_openmp_threads() == 0
