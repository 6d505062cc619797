"""IncrementalDetokenizer against a GPT-2-style byte-level BPE tokenizer trained here, offline.

The invariant: the deltas plus flush() always add up to tokenizer.decode(output ids), cut at the
earliest-ending stop string; and no delta ever carries half a character or half a stop string.
"""

from __future__ import annotations

import random

import pytest

from fp4serve.engine.detokenizer import IncrementalDetokenizer
from fp4serve.sampling_params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained on English only, so non-ASCII characters stay split into bytes."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = ["The quick brown fox jumps over the lazy dog.\n\nUser: hello there, how are you?\nAssistant: fine! "]
    bpe.train_from_iterator(corpus * 10, vocab_size=350, min_frequency=2, special_tokens=SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=SPECIALS[0], additional_special_tokens=SPECIALS[1:]
    )


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`, so a multi-byte character spans several tokens."""
    return [tokenizer.convert_tokens_to_ids(_BYTE_TO_CHAR[b]) for b in text.encode()]


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which names the 256 single-byte tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_TO_CHAR = _gpt2_bytes_to_unicode()


def stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    """Feed the chunks in order; the deltas, flush() last."""
    return [detok.add_tokens(chunk) for chunk in chunks] + [detok.flush()]


def expected_text(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The reference cut, written independently: the stop occurrence that ends first wins."""
    matches = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if not matches:
        return full, None
    end, start, stop = min(matches)
    return full[: end if include else start], stop


def test_plain_text_round_trips(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("User: hi"), SamplingParams())
    deltas = stream(detok, [[i] for i in ids])
    assert "".join(deltas) == text == detok.output_text
    assert all(deltas[:-1]) and deltas[-1] == ""  # ASCII: every token is emitted at once
    assert not detok.stopped and detok.stop_reason is None


def test_multibyte_characters_split_across_byte_tokens(tokenizer):
    text = "café 日本語 😀!"
    ids = byte_token_ids(tokenizer, text)
    assert len(ids) == len(text.encode())  # the test really splits characters
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    deltas = stream(detok, [[i] for i in ids])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # A character appears at its last byte, all at once: "😀" is 4 tokens, 3 of them silent.
    emoji = text.encode().index("😀".encode())
    assert deltas[emoji : emoji + 4] == ["", "", "", "😀"]


def test_incomplete_character_is_released_by_flush(tokenizer):
    ids = tokenizer.encode("ok ") + byte_token_ids(tokenizer, "日")[:2]
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    assert detok.add_tokens(ids) == "ok "
    assert detok.flush() == "\ufffd"
    assert detok.output_text == tokenizer.decode(ids)


def test_stop_string_split_across_tokens(tokenizer):
    params = SamplingParams(stop=["\n\nUser"])
    detok = IncrementalDetokenizer(tokenizer, [], params)
    pieces = ["Sure, fine.", "\n", "\nUs", "er", ": more"]
    deltas = [detok.add_tokens(byte_token_ids(tokenizer, p)) for p in pieces]
    assert detok.stopped and detok.stop_reason == "\n\nUser"
    assert detok.output_text == "Sure, fine."
    assert not any("\n" in d for d in deltas)  # no piece of the stop string was ever streamed
    assert deltas[-1] == "" and detok.flush() == ""


def test_include_stop_str_in_output(tokenizer):
    params = SamplingParams(stop=["\n\nUser"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    for piece in ["Sure.", "\n", "\nUs", "er", ": more"]:
        detok.add_tokens(byte_token_ids(tokenizer, piece))
    assert detok.output_text == "Sure.\n\nUser"
    assert detok.stop_reason == "\n\nUser"


def test_text_held_for_a_possible_stop_string_is_released_by_flush(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["\n\nUser"]))
    delta = detok.add_tokens(byte_token_ids(tokenizer, "abc\n\nUs"))
    assert delta == "ab"  # the last len(stop) - 1 = 5 characters wait
    assert detok.flush() == "c\n\nUs"
    assert detok.output_text == "abc\n\nUs" and not detok.stopped


def test_earliest_ending_stop_wins_and_later_tokens_are_ignored(tokenizer):
    params = SamplingParams(stop=["lazy dog", "fox"])
    detok = IncrementalDetokenizer(tokenizer, [], params)
    detok.add_tokens(tokenizer.encode("The quick brown fox jumps over the lazy dog."))
    assert detok.output_text == "The quick brown " and detok.stop_reason == "fox"
    assert detok.add_tokens(tokenizer.encode(" more")) == "" and detok.flush() == ""
    assert detok.output_text == "The quick brown "


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = byte_token_ids(tokenizer, "a.b.c")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["."], min_tokens=2))
    deltas = stream(detok, [[i] for i in ids])
    # "." arrives as the 2nd token, within min_tokens; the one at token 4 stops the output.
    assert "".join(deltas) == "a.b" and detok.stop_reason == "."


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    ids = tokenizer.encode("hello") + [tokenizer.convert_tokens_to_ids("<|im_end|>")] + tokenizer.encode(" there")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=skip))
    text = "".join(stream(detok, [[i] for i in ids]))
    assert text == ("hello there" if skip else "hello<|im_end|> there")


def test_prompt_ending_inside_a_character_does_not_leak_into_the_output(tokenizer):
    char = byte_token_ids(tokenizer, "語")
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi ") + char[:2], SamplingParams())
    text = "".join(stream(detok, [char[2:], tokenizer.encode(" ok")]))
    assert text == tokenizer.decode(char[2:] + tokenizer.encode(" ok"))


def test_work_per_token_does_not_grow_with_the_output(tokenizer):
    """Every decode call sees a short window, never the whole output."""
    window_sizes = []

    class CountingTokenizer:
        def decode(self, ids, **kwargs):
            window_sizes.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = byte_token_ids(tokenizer, "日本語 and text, " * 100)
    detok = IncrementalDetokenizer(CountingTokenizer(), tokenizer.encode("a prompt"), SamplingParams(stop=["zzz"]))
    text = "".join(stream(detok, [[i] for i in ids]))
    assert text == "日本語 and text, " * 100
    assert max(window_sizes) <= 8


def test_random_token_sequences_match_a_full_decode(tokenizer):
    """Random ids (invalid UTF-8, special tokens, split characters), random chunking and stop
    strings: the stream always adds up to the full decode cut at the stop."""
    rng = random.Random(1234)
    vocab = len(tokenizer)
    for _ in range(1500):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        skip = rng.random() < 0.5
        full = tokenizer.decode(output, skip_special_tokens=skip)
        stops = []
        for _ in range(rng.randrange(0, 3)):
            if full and rng.random() < 0.8:
                start = rng.randrange(len(full))
                stops.append(full[start : start + rng.randrange(1, 6)])
            else:
                stops.append("never there")
        include = rng.random() < 0.5
        params = SamplingParams(stop=stops, include_stop_str_in_output=include, skip_special_tokens=skip)
        detok = IncrementalDetokenizer(tokenizer, prompt, params)
        chunks, i = [], 0
        while i < len(output):
            size = rng.randrange(1, 5)
            chunks.append(output[i : i + size])
            i += size
        text = "".join(stream(detok, chunks))
        want, stop = expected_text(full, params.stop, include)
        assert text == want == detok.output_text, (prompt, output, params)
        assert detok.stop_reason == stop and detok.stopped == (stop is not None)
