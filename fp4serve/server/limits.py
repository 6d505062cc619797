"""Request body size limit: ASGI middleware that answers 413 (OpenAI error JSON) for a body over
the limit before anything parses it. A body that announces its length is judged by its header (the
HTTP server holds it to that length); a chunked one is read here, up to the limit, then replayed."""

from __future__ import annotations

from starlette.datastructures import Headers

from fp4serve.server.protocol import APIError, error_json


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_json(
            APIError(413, f"the request body is larger than the limit of {self.max_bytes} bytes", code="request_too_large")
        )
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
