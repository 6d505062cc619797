"""The engine flags of serve, generate, chat and bench offline, built from EngineConfig's fields so
that names, defaults, choices and help are written once, in config.py: field max_num_seqs is the
flag --max-num-seqs (vLLM's name), and the field's metadata (config.engine_arg) adds the rest."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from fp4serve.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        names, options = _argument(field, hints[field.name])
        parser.add_argument(*names, **options)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of parsed arguments that add_engine_args declared."""
    return EngineConfig.from_kwargs(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(EngineConfig)}
    )


def _argument(field: dataclasses.Field, hint) -> tuple[list[str], dict]:
    """add_argument's names and options for one field."""
    meta = field.metadata
    options = {"default": field.default, "help": meta.get("help")}
    if "choices" in meta:
        options["choices"] = list(meta["choices"])
    if meta.get("positional"):
        return [field.name], {"nargs": "?", **options}
    names = ["--" + field.name.replace("_", "-"), *meta.get("aliases", ())]
    if hint is bool:
        options["action"] = argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"
    elif _holds_only(hint, int):
        options["type"] = int
    elif _holds_only(hint, float):
        options["type"] = float
    return names, options


def _holds_only(hint, kind: type) -> bool:
    """kind or kind | None. Other fields (kv_cache_memory: int | str | None) take the text as
    typed, for EngineConfig to parse."""
    return hint is kind or set(typing.get_args(hint)) == {kind, type(None)}
