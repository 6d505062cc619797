"""Incremental detokenization and stop strings: token ids in, text deltas out.

Decoding each new token on its own is wrong (a byte-level token can be half of a UTF-8 character,
and SentencePiece tokens drop their leading space at the start of a decode), and re-decoding the
whole output every step costs O(length) per token. So, like vLLM and TGI, we decode a short window:

    ids:   ... [prefix_offset ......... read_offset ......... end]
                \\_ already emitted _/   \\_ not yet emitted _/

    new text = decode(ids[prefix_offset:end]) minus decode(ids[prefix_offset:read_offset])

The window starts with the last few prompt tokens, so the first output token is decoded in context.
Text that ends in U+FFFD is an incomplete character: it is held back until a later token completes
it (or until `flush`). Decoding never applies `clean_up_tokenization_spaces`, which is not local and
would make windowed decoding disagree with a full decode.

Stop strings are searched in the new text plus the (longest stop - 1) characters before it, so a
stop string split across tokens is found when its last piece arrives; the earliest-ending match
wins; as in vLLM, stop strings are not looked for until the output is longer than min_tokens. Unless
the stop string is to be included, the last (longest stop - 1) characters are held back so that a
stop string is never partly streamed.
"""

from __future__ import annotations

from fp4serve.sampling_params import SamplingParams

# Prompt tokens decoded as context in front of the first output token (vLLM uses the same number).
_PROMPT_CONTEXT = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """One request's output text, built token by token."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop_strings: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.output_text = ""  # all text emitted so far
        self.stop_reason: str | None = None  # the stop string that ended the output
        self.stopped = False

        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: completing it is not the output's text.
            context = []
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

        longest = max((len(s) for s in self.stop_strings), default=0)
        self._lookback = max(longest - 1, 0)  # characters a stop string can reach back into
        self._recent = ""  # the last `_lookback` characters decoded, emitted or not
        self._held = ""  # text decoded but not emitted: a possible beginning of a stop string
        self._num_tokens = 0
        self._finished = False

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append generated tokens; return the text that may be emitted now (possibly "")."""
        if self._finished or self.stopped:
            return ""
        self._num_tokens += len(token_ids)
        new_text = "".join(self._decode_next(token_id) for token_id in token_ids)
        return self._emit(new_text, final=False)

    def flush(self) -> str:
        """At the end of the request: release text held back for incomplete characters or stop strings."""
        if self._finished or self.stopped:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._read_offset = len(self._ids)
        delta = self._emit(full_text[len(prefix_text) :], final=True)
        self._finished = True
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_next(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while it (or an earlier token) ends a partial character."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _emit(self, new_text: str, final: bool) -> str:
        """Check `new_text` for stop strings and return what can be streamed now."""
        if not new_text and not final:
            return ""
        window = self._recent + new_text
        # As in vLLM, stop strings count only once the output is longer than min_tokens.
        match = self._find_stop(window, len(self._recent)) if self._num_tokens > self.min_tokens else None
        pending = self._held + new_text
        if match is not None:
            stop, start, end = match
            cut = end if self.include_stop_str_in_output else start
            # `window` and `pending` both end with new_text, so cut back from their common end.
            delta = pending[: len(pending) - (len(window) - cut)]
            self.stop_reason, self.stopped = stop, True
            self._held = ""
        else:
            hold = 0 if final or self.include_stop_str_in_output else self._lookback
            split = max(len(pending) - hold, 0)
            delta, self._held = pending[:split], pending[split:]
        self._recent = window[max(len(window) - self._lookback, 0) :]
        self.output_text += delta
        return delta

    def _find_stop(self, window: str, search_from: int) -> tuple[str, int, int] | None:
        """(stop string, start, end) of the earliest-ending match that ends after `search_from`.

        Matches that end earlier were seen by earlier calls (or ignored there, under min_tokens).
        Earliest end, then earliest start, makes the result independent of how the text was split
        into tokens.
        """
        best = None
        for stop in self.stop_strings:
            start = window.find(stop, max(search_from - len(stop) + 1, 0))
            if start < 0:
                continue
            key = (start + len(stop), start)
            if best is None or key < best[0]:
                best = (key, stop)
        if best is None:
            return None
        (end, start), stop = best
        return stop, start, end
