"""A real uvicorn server on a free loopback port, in a background thread, for the server tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from fp4serve.engine.async_engine import AsyncEngine
from fp4serve.engine.engine import LLMEngine
from fp4serve.server import build_app
from fp4serve.server.options import ServerOptions


class Server:
    """An app served by uvicorn in a thread; `url` is its /v1 base URL."""

    def __init__(self, engine: LLMEngine, names: list[str], api_key: str | None, options: ServerOptions | None = None):
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        app = build_app(self.async_engine, names, api_key, options)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        host, port = self._socket.getsockname()
        self.base = f"http://{host}:{port}"
        self.url = f"{self.base}/v1"
        # log_config=None: uvicorn's errors reach the root logger, where the `server` fixture sees them.
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self.async_engine.shutdown()
        self._socket.close()

    def wait_idle(self, timeout: float = 20) -> None:
        """Until the engine has no request and all KV blocks are free again."""
        pool = self.engine.block_pool
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished_requests() or self.engine.requests or pool.num_free != pool.num_blocks:
            assert time.monotonic() < deadline, (
                f"engine not idle: {len(self.engine.requests)} requests, {pool.num_free}/{pool.num_blocks} blocks free"
            )
            time.sleep(0.02)
