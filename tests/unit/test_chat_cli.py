"""`fp4serve chat` driven by scripted input on a tiny real engine: commands are never sent to the
model, Ctrl-C during a reply aborts it and keeps the partial turn (the engine left idle), Ctrl-C or
Ctrl-D at the prompt quits, and a reply cut by --max-tokens says so."""

from __future__ import annotations

import io
import os
import signal

import pytest
from conftest import make_checkpoint

from fp4serve import LLM, SamplingParams
from fp4serve.chat_cli import INTERRUPTED, TerminalChat
from fp4serve.cli import main

MAX_TOKENS = 6
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("chat-llama")
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    make_checkpoint(path, config)
    return path


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model), dtype="float32", max_model_len=96, max_num_seqs=2, kv_cache_memory="1MiB")


def script(*lines):
    """input() replacement: the given lines, then Ctrl-D (an item that is an exception is raised)."""
    items = iter(lines)

    def read(prompt: str) -> str:
        item = next(items, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException) or isinstance(item, BaseException):
            raise item
        return item

    return read


def chat(llm, *lines, out=None, params=PARAMS, system=None):
    out = out or io.StringIO()
    err = io.StringIO()
    session = TerminalChat(llm, params, system, read=script(*lines), out=out, err=err)
    session.run()
    return session, out, err.getvalue()


def assert_idle(engine):
    assert not engine.has_unfinished_requests()
    assert engine.block_pool.usage() == 0.0 and engine.requests == {}


def test_commands_are_not_sent_to_the_model(llm, monkeypatch):
    sent = []
    monkeypatch.setattr(llm.engine, "add_request", lambda *a, **k: sent.append(a))
    session, _, err = chat(llm, "/help", "/bogus now", "  ", "/EXIT", "never read")
    assert sent == [] and session.history == []
    for command in ("/help", "/reset", "/exit", "/quit", "//text"):
        assert command in err
    assert "unknown command /bogus; /help lists the commands" in err
    session, _, _ = chat(llm, "/quit", "never read")
    assert session.history == []


def test_a_conversation_its_reset_and_the_max_tokens_marker(llm):
    session, out, err = chat(llm, "w1 w2", "w3", "/reset", "w4 w5", system="be brief")
    assert err.count(f"[stopped: --max-tokens {MAX_TOKENS} reached]") == 3
    assert "(conversation reset)" in err
    roles = [turn["role"] for turn in session.history]
    assert roles == ["system", "user", "assistant"] and session.history[1]["content"] == "w4 w5"
    assert session.history[2]["content"] and session.history[2]["content"] in out.getvalue()
    assert_idle(llm.engine)


def test_double_slash_sends_a_leading_slash(llm):
    session, _, _ = chat(llm, "//etc is a folder")
    assert session.history[0] == {"role": "user", "content": "/etc is a folder"}


class InterruptingOutput(io.StringIO):
    """Ctrl-C after the first piece of the reply: raised (as without a handler), or sent as SIGINT."""

    def __init__(self, send_signal: bool):
        super().__init__()
        self.send_signal = send_signal
        self.pieces = 0

    def write(self, text):
        if text and text != "\n":
            self.pieces += 1
            if self.pieces == 2:
                if not self.send_signal:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


@pytest.mark.parametrize("send_signal", [False, True], ids=["raised", "sigint"])
def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(llm, send_signal):
    before = signal.getsignal(signal.SIGINT)
    out = InterruptingOutput(send_signal)
    session, _, err = chat(llm, "w1 w2 w3", "w4", out=out)
    assert INTERRUPTED in err and "Traceback" not in err
    [user, partial, again, reply] = session.history
    assert (user["content"], again["content"]) == ("w1 w2 w3", "w4")
    assert partial["role"] == "assistant" and partial["content"].endswith(f" {INTERRUPTED}")
    assert len(partial["content"].split()) == 3  # the two pieces shown, then the mark: nothing after Ctrl-C
    assert reply["role"] == "assistant" and INTERRUPTED not in reply["content"]  # the chat went on
    assert err.count(f"[stopped: --max-tokens {MAX_TOKENS} reached]") == 1
    assert_idle(llm.engine)
    assert signal.getsignal(signal.SIGINT) is before


def test_aborted_mid_reply_leaves_the_engine_idle(llm):
    out = InterruptingOutput(send_signal=False)
    chat(llm, "w7 w8", out=out)
    assert_idle(llm.engine)


@pytest.mark.parametrize("ending", [KeyboardInterrupt, EOFError])
def test_ctrl_c_or_ctrl_d_at_the_prompt_quit(llm, ending):
    session, _, _ = chat(llm, "w1", ending, "never read")
    assert [turn["role"] for turn in session.history] == ["user", "assistant"]


def test_a_prompt_too_long_is_an_error_line_not_a_crash(llm):
    session, _, err = chat(llm, " ".join(["w9"] * 120), "w1")
    assert "error: the prompt has" in err and "max_model_len is 96" in err
    assert [turn["content"] for turn in session.history[:1]] == ["w1"]


def test_the_chat_command(model, monkeypatch, capsys):
    lines = iter(["w1 w2", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["chat", str(model), "--dtype", "float32", "--max-model-len", "64", "--kv-cache-memory", "1MiB",
          "--max-tokens", "3", "--temperature", "0"])  # fmt: skip
    captured = capsys.readouterr()
    assert "/help lists the commands" in captured.err
    # greedy on this seeded model: three plain words, so the reply is cut by --max-tokens
    assert len(captured.out.replace(">", " ").split()) == 3
    assert "[stopped: --max-tokens 3 reached]" in captured.err
