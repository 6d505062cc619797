"""POST /tokenize, POST /detokenize and GET /tokenizer_info (vLLM's shapes): what the server would
feed the model for a prompt or a conversation, the text of token ids, and the tokenizer's settings
(which lm-evaluation-harness's remote tokenizer reads, so a client needs no copy of the model)."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from fp4serve.engine.async_engine import AsyncEngine
from fp4serve.server.chat import apply_chat_template
from fp4serve.server.prompt_work import PromptWork, chat_length
from fp4serve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    OpenAIModel,
    RequestModel,
    TokenId,
    ToolDefinition,
)
from fp4serve.tokenizer import NoTokenizer


class TokenizeRequest(RequestModel):
    """Either `prompt` (completions) or `messages` (chat, rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True  # for `prompt`; a chat template writes its own
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = None
    return_token_strs: bool = False


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(OpenAIModel):
    prompt: str


async def tokenize(engine: AsyncEngine, request: TokenizeRequest, work: PromptWork) -> TokenizeResponse:
    tokenizer = engine.tokenizer
    if (request.prompt is None) == (request.messages is None):
        raise APIError(400, "send exactly one of `prompt` and `messages`", param="prompt")
    if request.messages is not None:
        chat = ChatCompletionRequest(
            messages=request.messages,
            add_generation_prompt=request.add_generation_prompt,
            chat_template_kwargs=request.chat_template_kwargs,
            tools=request.tools,
        )
        work.check_length(chat_length(chat), "messages")
        tokens = await work.run(apply_chat_template, tokenizer, chat)
    else:
        work.check_length(len(request.prompt), "prompt")
        special = request.add_special_tokens
        tokens = await work.run(lambda: tokenizer(request.prompt, add_special_tokens=special).input_ids)
    strs = tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=strs)


class TokenizerInfoResponse(OpenAIModel):
    """tokenizer_class plus the tokenizer's own settings (tokenizer_config.json as loaded, special
    tokens as their text) and the chat template the server applies, as vLLM returns them."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


def tokenizer_info(tokenizer) -> TokenizerInfoResponse:
    if isinstance(tokenizer, NoTokenizer):
        raise APIError(404, f"this server has no tokenizer ({tokenizer.why})", code="no_tokenizer")
    settings = {name: _json_value(value) for name, value in tokenizer.init_kwargs.items()}
    # The template the server renders, which --chat-template may have replaced.
    settings["chat_template"] = tokenizer.chat_template
    return TokenizerInfoResponse(**settings, tokenizer_class=type(tokenizer).__name__)


def _json_value(value):
    """init_kwargs hold AddedToken objects (special tokens) and nested dicts of them."""
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return getattr(value, "content", None) or str(value)  # AddedToken -> its text


def detokenize(engine: AsyncEngine, request: DetokenizeRequest) -> DetokenizeResponse:
    vocab_size = engine.engine.vocab_size
    bad = [t for t in request.tokens if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"token ids out of the vocabulary [0, {vocab_size}): {bad[:10]}", param="tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens))
