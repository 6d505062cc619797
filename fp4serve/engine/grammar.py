"""Constrained decoding with xgrammar: a request's output is held to a JSON grammar or JSON schema by
masking, at every step, the tokens the grammar does not allow next.

The mask is a per-request logits processor (`SamplingParams.logits_processors`) that the sampler
calls with the row's output tokens so far. It keeps the grammar matcher in step with those tokens by
itself, rolling back when they change under it (a preempted request's tokens stay, but a
speculative verification may ask about positions that are later rejected), so the engine needs to
know nothing about grammars. xgrammar is optional: without it a constrained request is refused.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading

import torch

from fp4serve.errors import InvalidRequestError


def xgrammar_available() -> bool:
    return importlib.util.find_spec("xgrammar") is not None


class GrammarCompiler:
    """Compiles grammars for one tokenizer; built on first use (it indexes the whole vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        self._args = (tokenizer, vocab_size, sorted(stop_token_ids))
        self._compiler = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tokenizer, vocab_size, stop_ids = self._args
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def json_schema(self, schema: dict):
        # Compact JSON (no free whitespace): a weak model cannot pad its answer with blank lines forever.
        try:
            return self._get().compile_json_schema(json.dumps(schema), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's error for a schema it cannot use
            message = f"the JSON schema cannot be compiled into a grammar: {without_source_location(str(e))}"
            raise InvalidRequestError(message, "response_format") from e


# xgrammar prefixes its C++ errors with "[hh:mm:ss] /path/to/file.cc:123: ": the server's build
# layout, of no use to a client.
_SOURCE_LOCATION = re.compile(r"(\[[\d:]+\]\s*)?\S+\.(cc|cpp|cxx|h|hpp|py):\d+:\s*")


def without_source_location(message: str) -> str:
    return _SOURCE_LOCATION.sub("", message).strip()


class GrammarLogitsProcessor:
    """Masks the logits of one request to the tokens its grammar allows next. Called by the
    sampler (on the engine thread) as processor(output_token_ids, logits_row) with a [1, V] row."""

    def __init__(self, compiled_grammar):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled_grammar)
        self._bitmask = xgr.allocate_token_bitmask(1, compiled_grammar.tokenizer_info.vocab_size)
        self._accepted: list[int] = []  # the tokens the matcher has taken, in order
        self._stop_token_ids = list(compiled_grammar.tokenizer_info.stop_token_ids)

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> None:
        self._catch_up(output_token_ids)
        if self.matcher.is_terminated():
            return  # the grammar is complete: only stop tokens remain, unless ignore_eos asks for more
        self.matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device))
        if not torch.isfinite(logits).any():
            # No token of this vocabulary continues the grammar: end the request rather than sample nothing.
            logits[:, self._stop_token_ids] = 0.0

    def _catch_up(self, tokens: list[int]) -> None:
        common = 0
        for mine, theirs in zip(self._accepted, tokens):
            if mine != theirs:
                break
            common += 1
        if common < len(self._accepted):
            self.matcher.rollback(len(self._accepted) - common)
            del self._accepted[common:]
        for token in tokens[common:]:
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                break  # a token the grammar refuses (an unverified draft): keep the last valid state
            self._accepted.append(token)
