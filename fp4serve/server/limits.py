"""Request body size limit: ASGI middleware that answers 413 (OpenAI error JSON) for a body over
the limit, whether it announces its length or streams in chunks, before anything parses it."""

from __future__ import annotations

from starlette.datastructures import Headers

from fp4serve.server.protocol import APIError, error_json


class BodyTooLargeError(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large")


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_json(BodyTooLargeError(self.max_bytes))(scope, receive, send)
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)  # the app's APIError handler answers it
            return message

        await self.app(scope, counting_receive, send)
