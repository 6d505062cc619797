"""The checkpoint toolkit's subcommands: graft-mtp, strip-vision, rename-tensors, doctor (docs/toolkit.md)."""

from __future__ import annotations

import argparse
import sys

OUT_HELP = "write the result to this new directory (default: edit DIR in place, atomically)"


def add_toolkit_parsers(sub, common: argparse.ArgumentParser) -> None:
    graft = sub.add_parser(
        "graft-mtp",
        parents=[common],
        help="copy the 16-bit MTP head (mtp.*) of a base checkpoint into DIR, bit for bit",
        description="Copy every mtp.* tensor of BASE unchanged into DIR/model-mtp.safetensors, update the index, "
        "mtp_num_hidden_layers and the quantization ignore lists (the head stays 16-bit).",
    )
    graft.add_argument("dir", help="the (quantized) checkpoint that lacks the head")
    graft.add_argument("--from", dest="base", required=True, help="the 16-bit checkpoint holding mtp.* tensors")
    graft.add_argument("--force", action="store_true", help="replace the mtp.* tensors DIR already has")
    graft.add_argument("--out", default=None, help=OUT_HELP)
    graft.set_defaults(func=cmd_graft_mtp)

    strip = sub.add_parser(
        "strip-vision",
        parents=[common],
        help="remove the vision tower (model.visual.*, model.language_model.visual.*) for text-only serving",
        description="Remove the vision tensors, their ignore-list entries, and mark config.json language_model_only; "
        "the architecture and vision_config stay (serve vLLM with --language-model-only).",
    )
    strip.add_argument("dir")
    strip.add_argument("--out", default=None, help=OUT_HELP)
    strip.set_defaults(func=cmd_strip_vision)

    rename = sub.add_parser(
        "rename-tensors",
        parents=[common],
        help="rename tensors by prefix in the safetensors headers (tensor bytes and offsets unchanged)",
        description="Rename every tensor whose name starts with --from to start with --to, e.g. --from "
        "model.language_model.visual. --to model.visual.; headers are padded in place when they get no longer.",
    )
    rename.add_argument("dir")
    rename.add_argument("--from", dest="old", required=True, help="the prefix to replace")
    rename.add_argument("--to", dest="new", required=True, help="its replacement")
    rename.add_argument("--dry-run", action="store_true", help="list the renames, change nothing")
    rename.add_argument("--out", default=None, help=OUT_HELP)
    rename.set_defaults(func=cmd_rename_tensors)

    doctor = sub.add_parser(
        "doctor",
        parents=[common],
        help="check a checkpoint for what would make vLLM or fp4serve fail or load it wrong",
        description="Check files, tensor names, quantization, MTP head, values and tokenizer; exit 1 on any error, "
        "0 with only warnings. Each finding has a rule id (docs/toolkit.md), the tensors or files, and a fix.",
    )
    doctor.add_argument("dir")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument(
        "--for",
        dest="targets",
        choices=["vllm", "fp4serve"],
        action="append",
        help="the server to check for (default: both)",
    )
    doctor.add_argument("--skip-values", action="store_true", help="do not read every tensor for NaN/Inf and zeros")
    doctor.set_defaults(func=cmd_doctor)


def cmd_graft_mtp(args) -> None:
    from fp4serve.toolkit.graft_mtp import graft_mtp

    print("\n".join(graft_mtp(args.dir, args.base, args.out, args.force).lines()))


def cmd_strip_vision(args) -> None:
    from fp4serve.toolkit.strip_vision import strip_vision

    print("\n".join(strip_vision(args.dir, args.out).lines()))


def cmd_rename_tensors(args) -> None:
    from fp4serve.toolkit.rename_tensors import rename_tensors

    print("\n".join(rename_tensors(args.dir, args.old, args.new, args.out, args.dry_run).lines()))


def cmd_doctor(args) -> None:
    from fp4serve.toolkit.doctor.findings import TARGETS
    from fp4serve.toolkit.doctor.runner import as_json, as_text, exit_code, run_doctor

    targets = tuple(args.targets or TARGETS)
    findings = run_doctor(args.dir, targets, check_values=not args.skip_values)
    print(as_json(args.dir, targets, findings) if args.json else as_text(args.dir, findings))
    sys.exit(exit_code(findings))
