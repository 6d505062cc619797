"""benchmarks/gpu_check.py at toy sizes (--smoke), so the script a lent GPU runs once is known to run:
on CPU under the interpreter, every row of its table filled."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_prints_every_row(tmp_path):
    env = {**os.environ, "FP4SERVE_TRITON": "1", "FP4SERVE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("| check | measured | aim |") :].splitlines()[2:]
    checks = [line.split(" | ")[0].lstrip("| ") for line in table]
    for expected in ("NVFP4 GEMM", "KV write", "attention", "GDN decode", "GDN prefill", "copy bandwidth",
                     "NVFP4 GEMV", "decode tok/s", "default model"):  # fmt: skip
        assert any(expected in check for check in checks), (expected, checks)
    assert "nan" not in result.stdout.lower()
