"""The Triton kernels, on a GPU when there is one, else under Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
