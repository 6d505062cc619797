"""Where a model argument lives on disk: a local directory, else a Hugging Face hub id found in the
local hub cache (offline: fp4serve never downloads). Every model, tokenizer and drafter argument
goes through resolve_model_dir; docs/serving.md describes the cache layout it reads."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fp4serve.errors import ConfigError

# huggingface_hub's rule for repo ids: "name" or "namespace/name", word characters, "-" and ".".
_REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")
DEFAULT_REVISION = "main"


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub writes to: HF_HUB_CACHE (or its older name
    HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else ~/.cache/huggingface/hub. Read at each call,
    so a changed environment is seen."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def is_hub_id(name: str) -> bool:
    return (
        len(name) <= 96
        and _REPO_ID.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and not name.startswith((".", "-"))
    )


def resolve_model_dir(name: str | Path, revision: str | None = None, what: str = "model") -> Path:
    """The directory of `name`: the local directory of that spelling when there is one, else the
    cached snapshot of hub id `name` at `revision` (a branch, tag or commit; default main).
    `what` names the argument in errors ("model", "--tokenizer", "DFlash drafter")."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
    if not is_hub_id(name):
        raise ConfigError(f"{what} {name!r} is not a directory (nor a Hugging Face hub id such as org/name)")
    revision = revision or DEFAULT_REVISION
    cache = hub_cache_dir()
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshot, why = _snapshot(repo, revision)
    if snapshot is not None:
        return snapshot
    at = "" if revision == DEFAULT_REVISION else f" --revision {revision}"
    raise ConfigError(
        f"{what} {name!r} is not a local directory, and the Hugging Face cache {cache} does not hold it at "
        f"revision {revision} ({why}); fp4serve does not download models: fetch it first with "
        f"`hf download {name}{at}` (or `huggingface-cli download {name}{at}`), or set HF_HUB_CACHE / HF_HOME "
        "to the cache that has it"
    )


def _snapshot(repo: Path, revision: str) -> tuple[Path | None, str]:
    """The snapshot directory of `revision` in one repo's cache folder, or None and why not."""
    if not repo.is_dir():
        return None, f"no {repo.name} folder"
    if _COMMIT.fullmatch(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        if not ref.is_file():
            return None, f"no refs/{revision} in {repo.name}"
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return None, f"no snapshots/{commit} in {repo.name}"
    return snapshot, ""
