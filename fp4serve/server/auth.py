"""API-key auth: ASGI middleware in front of routing, so a request without the key is answered
before its body is parsed."""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers

from fp4serve.server.protocol import APIError, error_json

# Everything that serves or reveals model output needs the key; /health, /version and the API docs stay open.
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info", "/metrics")


class BearerAuth:
    """Protected routes must carry `Authorization: Bearer <api_key>` (the openai client's `api_key`).
    The scheme is case-insensitive (RFC 9110: "bearer" and "BEARER" are Bearer)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]) and not self._authorized(scope):
            error = APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )
            response = error_json(error, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(token.strip().encode(), self._expected)  # constant time: no timing oracle


def _protected(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES)
