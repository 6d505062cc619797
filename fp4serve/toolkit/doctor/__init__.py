"""`fp4serve doctor DIR`: find what would make a checkpoint fail to load, or load wrong, in vLLM or
fp4serve. One module per rule family (files, names, quantization, mtp, values, tokenizer), each a
`check(ctx)` that yields Findings; runner.py runs them in order. The rule ids are listed in
docs/toolkit.md."""

from fp4serve.toolkit.doctor.findings import Finding
from fp4serve.toolkit.doctor.runner import run_doctor

__all__ = ["Finding", "run_doctor"]
