"""A tiny OpenAI-shaped ASGI server whose behaviour each prompt chooses: a good stream with usage,
an HTTP error, a stream that drops, one that ends without [DONE], one that carries an error event.
Its /metrics counts drafts like vLLM would for every good request (2 drafts, 6 draft tokens,
3 accepted: 2 at position 0, 1 at position 1)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn

TOKENS = ["Hello", " there", ",", " friend", "."]
FIRST_TOKEN_DELAY = 0.05
TOKEN_GAP = 0.02


class FakeOpenAI:
    def __init__(self):
        self.good_requests = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/v1/models":
            return await self._json(send, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        if path == "/metrics":
            n = self.good_requests
            text = (
                "# TYPE vllm:spec_decode_num_drafts_total counter\n"
                f'vllm:spec_decode_num_drafts_total{{model_name="fake-model"}} {2 * n}.0\n'
                f'vllm:spec_decode_num_draft_tokens_total{{model_name="fake-model"}} {6 * n}.0\n'
                f'vllm:spec_decode_num_accepted_tokens_total{{model_name="fake-model"}} {3 * n}.0\n'
                f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="fake-model",position="0"}} {2 * n}.0\n'
                f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="fake-model",position="1"}} {1 * n}.0\n'
                f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="fake-model",position="2"}} 0.0\n'
            )
            return await self._send(send, 200, text.encode(), b"text/plain")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return await self._json(send, 404, {"error": {"message": f"no route {path}"}})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        prompt = request["messages"][0]["content"] if "messages" in request else request["prompt"]
        if prompt == "http500":
            error = {"error": {"message": "the engine fell over", "type": "server_error", "code": None}}
            return await self._json(send, 500, error)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        chat = "messages" in request

        async def event(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        def chunk(text):
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return {"id": "x", "choices": [choice]}

        if chat:
            await event({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(FIRST_TOKEN_DELAY)
        for i, token in enumerate(TOKENS):
            if i:
                await asyncio.sleep(TOKEN_GAP)
            await event(chunk(token))
            if prompt == "drop" and i == 1:
                raise RuntimeError("connection dropped on purpose")  # uvicorn closes the socket mid-body
        if prompt == "error event":
            await event({"error": {"message": "out of KV blocks", "type": "server_error"}})
        if prompt != "no done":
            usage = {"prompt_tokens": 7, "completion_tokens": len(TOKENS), "total_tokens": 7 + len(TOKENS)}
            await event({"id": "x", "choices": [], "usage": usage})
            await event("[DONE]")
        if prompt == "ok":
            self.good_requests += 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _json(self, send, status, payload):
        await self._send(send, status, json.dumps(payload).encode(), b"application/json")

    async def _send(self, send, status, body, content_type):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})


class FakeServer:
    """FakeOpenAI served by uvicorn in a thread on a free loopback port."""

    def __enter__(self):
        self.app = FakeOpenAI()
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/v1"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
