"""Strict weight loading: every parameter filled, every checkpoint tensor used or dropped on purpose.

Silently skipping tensors is how a mis-nested checkpoint ends up generating garbage, so any
missing or unexpected name is an error that lists the names."""
from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fp4serve.errors import CheckpointError
from fp4serve.layers.linear import Linear

log = logging.getLogger(__name__)

MAX_LISTED = 20


@dataclass
class LoadPlan:
    """How a family's checkpoint names map onto its modules."""

    # (our module suffix, checkpoint module suffix, shard index): q_proj -> qkv_proj shard 0
    stacked: list[tuple[str, str, int]] = field(default_factory=list)
    # checkpoint-name prefixes rewritten before lookup: ("model.language_model.", "model.")
    renames: list[tuple[str, str]] = field(default_factory=list)
    # fnmatch patterns of tensors dropped on purpose, with a reason for the log
    dropped: dict[str, str] = field(default_factory=dict)
    # parameter -> the parameter it shares storage with (tied embeddings): "lm_head.weight" -> ...
    tied: dict[str, str] = field(default_factory=dict)
    # fnmatch patterns of tensors that are in a known wrong place: any match is an error naming
    # them, with this advice (a mis-nested vision tower would otherwise just look "unexpected")
    refused: dict[str, str] = field(default_factory=dict)
    # fnmatch patterns of parameters whose absence has a known cause: advice added to the error
    missing_advice: dict[str, str] = field(default_factory=dict)


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def expected_keys(model: nn.Module) -> set[str]:
    """Everything a checkpoint must provide: per Linear shard, plus every other parameter."""
    keys = set()
    linear_prefixes = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Linear):
            linear_prefixes.add(prefix)
            names = module.method.tensor_names(module) + (["bias"] if module.bias is not None else [])
            for name in names:
                for shard in range(len(module.output_sizes)) if len(module.output_sizes) > 1 else [None]:
                    keys.add(_key(prefix, name, shard))
    for name, _ in model.named_parameters():
        if name.rsplit(".", 1)[0] not in linear_prefixes:
            keys.add(_key(*name.rsplit(".", 1), None))
    return keys


def _key(prefix: str, name: str, shard: int | None) -> str:
    return f"{prefix}.{name}" + ("" if shard is None else f"#{shard}")


def checkpoint_name(key: str, plan: LoadPlan) -> str:
    """The checkpoint tensor name that fills a parameter key: errors must name tensors the user
    can find in their files, not our fused parameters."""
    name, _, shard = key.partition("#")
    module_path, _, param = name.rpartition(".")
    if shard:
        for ours, theirs, index in plan.stacked:
            if index == int(shard) and module_path.endswith("." + ours):
                module_path = module_path[: -len(ours)] + theirs
                break
    return f"{module_path}.{param}"


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], plan: LoadPlan) -> None:
    modules = dict(model.named_modules())
    filled: set[str] = set()
    unexpected: list[str] = []
    dropped: Counter[str] = Counter()
    refused: dict[str, list[str]] = {}
    for ckpt_name, tensor in weights:
        wrong_place = next((p for p in plan.refused if fnmatch.fnmatchcase(ckpt_name, p)), None)
        if wrong_place is not None:
            refused.setdefault(wrong_place, []).append(ckpt_name)
            continue
        pattern = next((p for p in plan.dropped if fnmatch.fnmatchcase(ckpt_name, p)), None)
        if pattern is not None:
            dropped[pattern] += 1
            continue
        name = ckpt_name
        for old, new in plan.renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        module_path, _, param = name.rpartition(".")
        shard = None
        for ours, theirs, index in plan.stacked:
            if module_path.endswith("." + theirs):
                module_path = module_path[: -len(theirs)] + ours
                shard = index
                break
        module = modules.get(module_path)
        if isinstance(module, Linear):
            try:
                module.load(param, tensor, shard)
            except CheckpointError as e:
                raise CheckpointError(f"{ckpt_name}: {e}") from e
        elif module is not None and isinstance(getattr(module, param, None), nn.Parameter):
            target = getattr(module, param)
            if target.shape != tensor.shape:
                raise CheckpointError(f"{ckpt_name}: shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
            target.data.copy_(tensor)
        else:
            unexpected.append(ckpt_name)
            continue
        key = _key(module_path, param, shard)
        if key in filled:
            raise CheckpointError(f"{ckpt_name}: appears twice in the checkpoint")
        filled.add(key)
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in plan.tied.items():
        module_path, _, param = target.rpartition(".")
        setattr(modules[module_path], param, params[source])
        filled.add(_key(module_path, param, None))
    for pattern, count in dropped.items():
        log.info("dropped %d checkpoint tensors matching %s (%s)", count, pattern, plan.dropped[pattern])
    missing = {checkpoint_name(key, plan) for key in expected_keys(model) - filled}
    problems = [f"{len(names)} tensors {plan.refused[p]}: {_listing(names)}" for p, names in refused.items()]
    if missing:
        advice = [a for p, a in plan.missing_advice.items() if any(fnmatch.fnmatchcase(m, p) for m in missing)]
        problems.append(f"{len(missing)} missing tensors (model parameters never loaded): {_listing(missing)}"
                        + "".join(f" ({a})" for a in advice))  # fmt: skip
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (no parameter takes them): {_listing(unexpected)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
