"""The library's own guard: SamplingParams refuses values that would break an engine step, and
LLM.generate refuses token ids outside the vocabulary, each with an InvalidRequestError naming the field."""

from __future__ import annotations

import math

import pytest
from conftest import make_checkpoint
from transformers import LlamaConfig

from fp4serve import LLM, SamplingParams
from fp4serve.errors import InvalidRequestError

VOCAB = 300


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1e39, "min_tokens": 2}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"repetition_penalty": 1e-30}, "repetition_penalty"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"min_p": -math.inf}, "min_p"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"top_k": 2**70}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"stop_token_ids": [2**70]}, "stop_token_ids[0]"),
        ({"stop_token_ids": [3, False]}, "stop_token_ids[1]"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop": [5]}, "stop"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)  # fmt: skip
def test_sampling_params_name_the_bad_field(fields, param):
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**fields)
    assert error.value.param == param
    assert param.split("[")[0] in str(error.value)


def test_validate_catches_a_field_changed_after_construction():
    params = SamplingParams()
    params.temperature = math.nan
    with pytest.raises(InvalidRequestError, match="temperature must be a finite number"):
        params.validate()


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0, "top_p": 1, "top_k": -1, "min_p": 1, "presence_penalty": -2, "frequency_penalty": 2,
         "repetition_penalty": 0.01, "seed": -(2**63), "max_tokens": None, "min_tokens": 3, "logprobs": 20},
        {"temperature": 100, "repetition_penalty": 100, "seed": 2**64 - 1, "stop_token_ids": [0, 2**31 - 1]},
    ],
)  # fmt: skip
def test_the_documented_ranges_are_accepted(fields):
    """The ends of every range are accepted and kept as given (not clamped); top_k -1 is vLLM's
    spelling of "off", which SamplingParams stores as 0."""
    params = SamplingParams(**fields)
    expected = {**fields, "top_k": 0} if fields.get("top_k") == -1 else fields
    assert {name: getattr(params, name) for name in fields} == expected


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-validation")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    make_checkpoint(path, config)
    return LLM(str(path), dtype="float32", kv_cache_memory="1MiB")


@pytest.mark.parametrize(
    "prompt, params, param",
    [
        ({"prompt_token_ids": [1, VOCAB]}, {}, "prompt"),
        ({"prompt_token_ids": [1, True]}, {}, "prompt"),
        ({"prompt_token_ids": [1, "2"]}, {}, "prompt"),
        ({"prompt_token_ids": 7}, {}, "prompt_token_ids"),
        ([1, 2.0], {}, "prompt"),
        ({"prompt_token_ids": [1, 2]}, {"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ],
)  # fmt: skip
def test_generate_checks_token_ids_against_the_vocabulary(llm, prompt, params, param):
    with pytest.raises(InvalidRequestError) as error:
        llm.generate(prompt, SamplingParams(max_tokens=2, **params))
    assert error.value.param == param
    # The engine is left serving.
    assert len(llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2))[0].outputs[0].token_ids) <= 2
