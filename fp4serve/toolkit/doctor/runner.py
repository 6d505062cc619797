"""Run every rule family in order and report: text for people, JSON for scripts."""

from __future__ import annotations

import json
from pathlib import Path

from fp4serve.errors import CheckpointError
from fp4serve.toolkit.doctor import rules_files, rules_mtp, rules_names, rules_quant, rules_tokenizer, rules_values
from fp4serve.toolkit.doctor.findings import ERROR, TARGETS, Context, Finding

RULE_FAMILIES = (rules_files, rules_names, rules_quant, rules_mtp, rules_values, rules_tokenizer)


def run_doctor(path: str | Path, targets: tuple[str, ...] = TARGETS, check_values: bool = True) -> list[Finding]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise CheckpointError(f"unknown --for target {unknown[0]!r} (choose from {', '.join(TARGETS)})")
    ctx = Context(path, tuple(targets), check_values)
    findings = []
    for family in RULE_FAMILIES:
        findings.extend(f for f in family.check(ctx) if f.severity)
    return findings


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.severity == ERROR for f in findings) else 0


def as_text(path, findings: list[Finding]) -> str:
    lines = [f"{f.severity:7} {f.rule}  {f.message}\n          fix: {f.fix}" for f in findings]
    errors = sum(f.severity == ERROR for f in findings)
    lines.append(f"{path}: {errors} errors, {len(findings) - errors} warnings")
    return "\n".join(lines)


def as_json(path, targets, findings: list[Finding]) -> str:
    errors = sum(f.severity == ERROR for f in findings)
    return json.dumps(
        {"path": str(path), "targets": list(targets), "errors": errors, "warnings": len(findings) - errors,
         "findings": [f.to_json() for f in findings]},
        indent=2,
    )  # fmt: skip
