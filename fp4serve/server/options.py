"""Server-only settings (the `serve` flags that are not engine flags), checked once at start."""

from __future__ import annotations

from dataclasses import dataclass

from fp4serve.config import parse_bytes
from fp4serve.errors import ConfigError
from fp4serve.multimodal.image_fetch import MediaPolicy
from fp4serve.server.reasoning import REASONING_PARSERS
from fp4serve.server.tools import TOOL_PARSERS

DEFAULT_MAX_REQUEST_BODY_SIZE = 16 * 2**20
DEFAULT_RESPONSES_STORE_SIZE = 1024


@dataclass
class ServerOptions:
    reasoning_parser: str | None = None  # --reasoning-parser: qwen3
    tool_call_parser: str | None = None  # --tool-call-parser: hermes | qwen3_coder | qwen3_xml
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice: parse tool calls for tool_choice "auto"
    max_queue: int | None = None  # --max-queue: waiting requests beyond which new ones get 503
    max_request_body_size: int | str = DEFAULT_MAX_REQUEST_BODY_SIZE  # --max-request-body-size, bytes
    enable_tokenizer_info_endpoint: bool = False  # --enable-tokenizer-info-endpoint: GET /tokenizer_info
    responses_store_size: int = DEFAULT_RESPONSES_STORE_SIZE  # /v1/responses kept for previous_response_id
    # --allowed-media-domains: hosts whose http(s) image URLs are fetched (none: data: URLs only)
    allowed_media_domains: tuple[str, ...] = ()

    def __post_init__(self):
        self.max_request_body_size = parse_bytes(self.max_request_body_size)
        self.allowed_media_domains = tuple(d.lower() for d in self.allowed_media_domains or ())
        unknown = []  # both parsers in one message, as recipes often name both
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            unknown.append(f"--reasoning-parser {self.reasoning_parser}: fp4serve has no such reasoning parser "
                           f"(it has {', '.join(REASONING_PARSERS)})")  # fmt: skip
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            unknown.append(f"--tool-call-parser {self.tool_call_parser}: fp4serve has no such tool-call parser "
                           f"(it has {', '.join(TOOL_PARSERS)})")  # fmt: skip
        if unknown:
            raise ConfigError("; ".join(unknown))
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice requires --tool-call-parser")
        if self.max_queue is not None and self.max_queue < 1:
            raise ConfigError("--max-queue must be >= 1")
        if self.responses_store_size < 0:
            raise ConfigError("responses_store_size must be >= 0")
        if self.max_request_body_size < 1:
            raise ConfigError("--max-request-body-size must be at least 1 byte")

    def media_policy(self) -> MediaPolicy:
        return MediaPolicy(allowed_domains=self.allowed_media_domains)
