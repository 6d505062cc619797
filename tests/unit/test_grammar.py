"""GrammarLogitsProcessor: masks follow the request's tokens, also when they change under it (a
speculative step's rejected drafts), and a grammar the vocabulary cannot continue ends the request."""

from __future__ import annotations

import math

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from fp4serve.engine.grammar import GrammarLogitsProcessor

VOCAB = ["{", "}", '"', "a", "b", ":", ",", "1", "2", "</s>", "x", " "]
STOP = VOCAB.index("</s>")
SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false}'


@pytest.fixture(scope="module")
def compiled():
    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, stop_token_ids=[STOP])
    return xgr.GrammarCompiler(info).compile_json_schema(SCHEMA, any_whitespace=False)


def ids(text: str) -> list[int]:
    return [VOCAB.index(ch) for ch in text]


def allowed(processor, tokens: list[int]) -> set[str]:
    logits = torch.zeros(1, len(VOCAB))
    processor(tokens, logits)
    return {VOCAB[i] for i in range(len(VOCAB)) if logits[0, i] != -math.inf}


def test_masks_follow_the_output(compiled):
    processor = GrammarLogitsProcessor(compiled)
    assert allowed(processor, []) == {"{"}
    assert allowed(processor, ids("{")) == {'"'}
    assert allowed(processor, ids('{"a": ')) == {"1", "2"}  # and a minus sign, absent from this vocabulary
    assert "}" in allowed(processor, ids('{"a": 1'))
    assert allowed(processor, ids('{"a": 12}')) == {"</s>"}  # complete: only a stop token


def test_tokens_changed_under_it_roll_back(compiled):
    """After a rejected draft, the mask equals that of a processor that never saw the draft."""
    processor = GrammarLogitsProcessor(compiled)
    allowed(processor, ids('{"a": 12'))  # a verification step looked ahead with drafted "2"
    for tokens in (ids('{"a": 1'), ids('{"a": 1}'), ids("{"), ids('{"a": 21')):
        assert allowed(processor, tokens) == allowed(GrammarLogitsProcessor(compiled), tokens)


def test_a_refused_token_keeps_the_last_valid_state(compiled):
    processor = GrammarLogitsProcessor(compiled)
    assert allowed(processor, ids('{"x')) == allowed(GrammarLogitsProcessor(compiled), ids('{"'))


def test_nothing_allowed_means_stop(compiled):
    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, stop_token_ids=[STOP])
    only_strings = xgr.GrammarCompiler(info).compile_json_schema('{"type": "string", "pattern": "^z+$"}')
    processor = GrammarLogitsProcessor(only_strings)
    assert allowed(processor, ids('"')) == {"</s>"}  # no "z" in this vocabulary
