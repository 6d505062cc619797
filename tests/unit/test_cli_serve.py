"""`fp4serve serve` flags: vLLM's names reach the server, vLLM flags fp4serve lacks are refused
with a message that says so (never ignored), and the start message is a working curl line."""

from __future__ import annotations

import json
import shlex

import pytest

import fp4serve.server.app as app_module
from fp4serve.cli import UNSUPPORTED_VLLM_FLAGS, build_parser, main
from fp4serve.errors import ConfigError
from fp4serve.server.app import ready_message
from fp4serve.server.options import ServerOptions


@pytest.fixture
def served(monkeypatch):
    """Run `fp4serve serve ...` up to run_server and capture what it was given."""
    calls = []
    monkeypatch.setattr(app_module, "run_server", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def test_server_flags_reach_run_server(served, monkeypatch):
    monkeypatch.setenv("FP4SERVE_API_KEY", "from-env")
    main(["serve", "some/dir", "--served-model-name", "a", "b", "--port", "9001", "--host", "0.0.0.0",
          "--reasoning-parser", "qwen3", "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice",
          "--max-queue", "7", "--max-request-body-size", "1MiB", "--max-model-len", "4096",
          "--enable-prefix-caching", "--trust-remote-code", "--enforce-eager"])  # fmt: skip
    [(args, kwargs)] = served
    config = args[0]
    assert (config.model, config.max_model_len, config.enable_prefix_caching) == ("some/dir", 4096, True)
    assert kwargs["served_model_names"] == ["a", "b"] and (kwargs["host"], kwargs["port"]) == ("0.0.0.0", 9001)
    assert kwargs["api_key"] == "from-env"
    assert kwargs["options"] == ServerOptions("qwen3", "qwen3_coder", True, 7, 2**20)

    main(["serve", "--api-key", "from-flag"])
    assert served[1][1]["api_key"] == "from-flag"  # the flag wins over the environment


@pytest.mark.parametrize("flags", list(UNSUPPORTED_VLLM_FLAGS))
def test_unsupported_vllm_flags_are_refused(flags, served, capsys):
    for flag in flags:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["serve", flag, "1"])
        assert exit_info.value.code == 2
        assert f"{flag}: fp4serve does not support this vLLM flag yet" in capsys.readouterr().err
    assert not served


def test_inconsistent_server_options(served, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--enable-auto-tool-choice"])
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--tool-call-parser", "pythonic"])  # not one of ours: the message lists them
    err = capsys.readouterr().err
    assert "--tool-call-parser pythonic: fp4serve has no such tool-call parser (it has hermes, " in err
    with pytest.raises(SystemExit):
        main(["serve", "--reasoning-parser", "deepseek_r1"])
    assert "--reasoning-parser deepseek_r1: fp4serve has no such reasoning parser (it has qwen3)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--max-queue must be >= 1"):
        ServerOptions(max_queue=0)
    assert not served


def test_ready_message_is_a_working_curl_line():
    message = ready_message("0.0.0.0", 8123, "my-model", with_key=True)
    url_line, curl_line = message.splitlines()
    assert url_line.endswith("http://127.0.0.1:8123/v1")
    words = shlex.split(curl_line.replace("$FP4SERVE_API_KEY", "KEY"))
    assert words[:2] == ["curl", "http://127.0.0.1:8123/v1/chat/completions"]
    assert "Authorization: Bearer KEY" in words
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == "my-model" and body["messages"][0]["role"] == "user"
