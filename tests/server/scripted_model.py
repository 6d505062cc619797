"""A live server whose model's replies are scripted: a tiny random Llama with SmolLM2's real
tokenizer and a chosen chat template, and a sampler that emits a set text then EOS. The output is
known exactly while every other part (engine, scheduler, detokenizer, parsers, SSE) runs for real."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from conftest import make_checkpoint
from live_server import Server
from transformers import AutoTokenizer, LlamaConfig

import fp4serve.engine.engine as engine_module
from fp4serve.config import EngineConfig
from fp4serve.engine.engine import LLMEngine
from fp4serve.sample.sampler import SamplerOutput
from fp4serve.server.options import ServerOptions


def scripted_server(smollm2_path: Path, path: Path, template: str, options: ServerOptions) -> Server:
    """A server named "scripted" over a tiny model in `path` that renders chats with `template`."""
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    make_checkpoint(path, config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / name, path / name)
    (path / "chat_template.jinja").write_text(template)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", max_model_len=512, kv_cache_memory="4MiB"))
    return Server(engine, ["scripted"], None, options)


def script_replies(monkeypatch, tokenizer) -> Callable[[str], None]:
    """Patch the engine's sampler; the returned say(text) makes every request's output exactly
    `text`, then EOS."""
    script: list[int] = []

    def scripted_sample(logits, rows):
        tokens = [script[len(row.output_token_ids)] if len(row.output_token_ids) < len(script) else
                  tokenizer.eos_token_id for row in rows]  # fmt: skip
        return SamplerOutput(token_ids=tokens, logprobs=[None] * len(rows))

    monkeypatch.setattr(engine_module, "sample", scripted_sample)

    def say(text: str) -> None:
        script[:] = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(script) == text

    return say
