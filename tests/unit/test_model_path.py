"""Hub ids resolve offline from the local Hugging Face cache (HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), for the model, --tokenizer and a DFlash drafter; a local directory of the
same spelling wins; a missing one is an error that says how to download it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from spec_checkpoints import make_dflash_drafter, make_mtp_target

from fp4serve import LLM, SamplingParams
from fp4serve.cli import build_parser
from fp4serve.engine_args import engine_config
from fp4serve.errors import ConfigError
from fp4serve.model_path import hub_cache_dir, resolve_model_dir

ENGINE = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 2, "kv_cache_memory": "4MiB"}
GREEDY = SamplingParams(temperature=0, max_tokens=4)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """huggingface_hub's layout: models--org--name/refs/<ref> holds the commit of snapshots/<commit>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    if ref is not None:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen3.5 target with an MTP head, and a DFlash drafter for it."""
    root = tmp_path_factory.mktemp("hub-sources")
    hf = make_mtp_target(root / "target")
    make_dflash_drafter(root / "drafter", hf.config, num_layers=1, block_size=4)
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local directory named like the ids below
    return cache


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert hub_cache_dir() == tmp_path / "explicit"


def test_target_and_dflash_drafter_load_from_the_cache(checkpoints, hub):
    target = cache_repo(hub, "org/tiny-target", checkpoints / "target")
    drafter = cache_repo(hub, "org/tiny-drafter", checkpoints / "drafter", commit="f" * 40)
    spec = {"method": "dflash", "model": "org/tiny-drafter", "num_speculative_tokens": 3}
    llm = LLM("org/tiny-target", speculative_config=spec, tokenizer="org/tiny-target", **ENGINE)
    assert llm.engine.model_path == target
    assert llm.engine.spec_config.model == drafter
    [output] = llm.generate(["w1 w2 w3"], GREEDY)
    assert len(output.outputs[0].token_ids) == GREEDY.max_tokens
    # the same output as from the directory itself
    [direct] = LLM(str(checkpoints / "target"), **ENGINE).generate(["w1 w2 w3"], GREEDY)
    assert output.outputs[0].token_ids == direct.outputs[0].token_ids


def test_serve_flags_take_a_hub_id_and_revision(checkpoints, hub):
    cache_repo(hub, "org/tiny-target", checkpoints / "target", ref="v1")  # only the tag, no main
    args = build_parser().parse_args(["serve", "org/tiny-target", "--revision", "v1", "--max-model-len", "64"])
    config = engine_config(args)
    assert (config.model, config.revision) == ("org/tiny-target", "v1")
    assert resolve_model_dir(config.model, config.revision) == hub / "models--org--tiny-target" / "snapshots" / COMMIT
    assert resolve_model_dir("org/tiny-target", COMMIT) == hub / "models--org--tiny-target" / "snapshots" / COMMIT
    with pytest.raises(ConfigError, match="no refs/main in models--org--tiny-target"):
        resolve_model_dir("org/tiny-target")


def test_a_local_directory_wins_over_the_hub_id(checkpoints, hub, tmp_path):
    cache_repo(hub, "org/tiny-target", checkpoints / "target")
    local = tmp_path / "org" / "tiny-target"
    shutil.copytree(checkpoints / "target", local)
    assert resolve_model_dir("org/tiny-target") == Path("org/tiny-target")
    assert resolve_model_dir("org/tiny-target").resolve() == local


def test_missing_hub_id_says_where_it_looked_and_how_to_download(hub):
    with pytest.raises(ConfigError) as e:
        LLM("org/not-here", **ENGINE)
    message = str(e.value)
    assert "model 'org/not-here' is not a local directory" in message
    assert f"the Hugging Face cache {hub} does not hold it at revision main" in message
    assert "`hf download org/not-here`" in message and "`huggingface-cli download org/not-here`" in message
    with pytest.raises(ConfigError, match=r"hf download org/not-here --revision v2"):
        resolve_model_dir("org/not-here", "v2")


def test_missing_drafter_and_tokenizer_hub_ids_are_named(checkpoints, hub, caplog):
    cache_repo(hub, "org/tiny-target", checkpoints / "target")
    spec = {"method": "dflash", "model": "z-lab/missing-drafter"}
    with pytest.raises(ConfigError) as e:
        LLM("org/tiny-target", speculative_config=spec, **ENGINE)
    message = str(e.value)
    assert message.startswith("--speculative-config: DFlash drafter 'z-lab/missing-drafter' is not a local directory")
    assert "hf download z-lab/missing-drafter" in message and "no config.json" not in message
    with caplog.at_level(logging.INFO, logger="fp4serve.models.loader"), pytest.raises(ConfigError) as e:
        LLM("org/tiny-target", tokenizer="org/missing-tokenizer", **ENGINE)
    assert "--tokenizer 'org/missing-tokenizer' is not a local directory" in str(e.value)
    assert "loaded " not in caplog.text  # refused before the weights load


def test_a_path_that_is_no_hub_id_is_not_a_directory(hub):
    with pytest.raises(ConfigError, match=r"model '/no/such/dir' is not a directory \(nor a Hugging Face hub id"):
        resolve_model_dir("/no/such/dir")
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_model_dir(Path("/no/such/dir"))  # LLM(Path(...)) as before
