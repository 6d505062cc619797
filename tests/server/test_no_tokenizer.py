"""Model directories without a tokenizer (test and converted checkpoints), and
--skip-tokenizer-init: token-id prompts work in the library and over HTTP (official openai client),
text prompts get a clear error, --tokenizer DIR brings text back."""

from __future__ import annotations

import shutil

import openai
import pytest
from conftest import make_checkpoint
from live_server import Server
from transformers import LlamaConfig

from fp4serve import LLM, SamplingParams
from fp4serve.config import EngineConfig
from fp4serve.engine.engine import LLMEngine
from fp4serve.errors import ConfigError, InvalidRequestError
from fp4serve.tokenizer import TOKENIZER_FILES

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT_IDS = [5, 17, 42, 99, 3]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(the same weights with a tokenizer, without one)."""
    with_tokenizer = tmp_path_factory.mktemp("with-tokenizer")
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    make_checkpoint(with_tokenizer, config)
    bare = tmp_path_factory.mktemp("no-tokenizer")
    for file in with_tokenizer.iterdir():
        if file.name not in TOKENIZER_FILES and "token" not in file.name and file.suffix != ".jinja":
            shutil.copy(file, bare / file.name)
    assert not any((bare / name).exists() for name in TOKENIZER_FILES)
    return with_tokenizer, bare


def test_a_directory_without_tokenizer_serves_token_ids(checkpoints):
    with_tokenizer, bare = checkpoints
    reference = LLM(str(with_tokenizer), dtype="float32", kv_cache_memory="4MiB").generate(
        {"prompt_token_ids": PROMPT_IDS}, GREEDY
    )
    llm = LLM(str(bare), dtype="float32", kv_cache_memory="4MiB")
    out = llm.generate({"prompt_token_ids": PROMPT_IDS}, GREEDY)[0].outputs[0]
    assert out.token_ids == reference[0].outputs[0].token_ids and len(out.token_ids) == 6
    assert out.text == ""
    with pytest.raises(
        InvalidRequestError, match="a text prompt needs a tokenizer.*has no tokenizer files.*--tokenizer DIR"
    ):
        llm.generate("w1 w2", GREEDY)
    with pytest.raises(InvalidRequestError, match="chat conversation needs a tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY)
    with pytest.raises(InvalidRequestError, match="stop strings need a tokenizer"):
        llm.generate({"prompt_token_ids": PROMPT_IDS}, SamplingParams(max_tokens=4, stop=["w1"]))
    pool = llm.engine.block_pool
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests and pool.num_free == pool.num_blocks


def test_tokenizer_flag_brings_text_back_and_skip_init_drops_it(checkpoints):
    with_tokenizer, bare = checkpoints
    llm = LLM(str(bare), tokenizer=str(with_tokenizer), dtype="float32", kv_cache_memory="4MiB")
    out = llm.generate({"prompt_token_ids": PROMPT_IDS}, GREEDY)[0].outputs[0]
    assert out.text.split() == [f"w{t}" for t in out.token_ids]  # the word tokenizer's text
    skipped = LLM(str(with_tokenizer), skip_tokenizer_init=True, dtype="float32", kv_cache_memory="4MiB")
    assert skipped.generate({"prompt_token_ids": PROMPT_IDS}, GREEDY)[0].outputs[0].text == ""
    with pytest.raises(InvalidRequestError, match=r"--skip-tokenizer-init"):
        skipped.generate("w1", GREEDY)
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        LLM(
            str(with_tokenizer), tokenizer=str(bare), dtype="float32", kv_cache_memory="4MiB"
        )  # an explicit dir must have one


def test_http_token_id_prompts_and_clear_errors(checkpoints):
    _, bare = checkpoints
    engine = LLMEngine(EngineConfig(model=str(bare), dtype="float32", kv_cache_memory="4MiB"))
    server = Server(engine, ["bare"], None)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)
        done = client.completions.create(model="bare", prompt=PROMPT_IDS, max_tokens=5, temperature=0)
        assert done.choices[0].text == "" and done.usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError, match="needs a tokenizer"):
            client.completions.create(model="bare", prompt="w1 w2", max_tokens=5)
        with pytest.raises(openai.BadRequestError, match="needs a tokenizer"):
            client.chat.completions.create(model="bare", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        server.wait_idle()
    finally:
        server.stop()
