"""The HTTP server: routes, API-key auth, every error as OpenAI error JSON, client disconnects, and
`run_server`, which loads the engine and runs uvicorn.

Routes only resolve the model name and hand the parsed request to chat.py or completions.py, which
return a response model or an EventStream; this module turns either into HTTP. A client that goes
away cancels its handler (non-streaming) or its stream, and both paths abort the engine request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from fp4serve.config import EngineConfig
from fp4serve.engine.async_engine import AsyncEngine
from fp4serve.errors import Fp4ServeError
from fp4serve.server.chat import create_chat_completion
from fp4serve.server.completions import create_completion
from fp4serve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EventStream,
    ModelCard,
    ModelList,
    error_response,
)

log = logging.getLogger(__name__)


def build_app(async_engine: AsyncEngine, served_model_names: list[str], api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over a running AsyncEngine. The first served name is the default
    for requests that name no model; every name is an alias of the one model."""
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    app = FastAPI(title="fp4serve", summary="OpenAI-compatible LLM server")
    _install_error_handlers(app)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    def resolve_model(requested: str | None) -> str:
        if not requested:
            return served_model_names[0]
        if requested not in served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")
        return requested

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            return _error_json(APIError(503, "the engine is not running"))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        root = str(async_engine.engine.model_path)
        cards = [ModelCard(id=name, root=root, max_model_len=async_engine.max_model_len) for name in served_model_names]
        return ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = resolve_model(body.model)
        return await _respond(request, create_completion(async_engine, body, model))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = resolve_model(body.model)
        return await _respond(request, create_chat_completion(async_engine, body, model))

    return app


# ---- responses and disconnects ------------------------------------------------------------------
class EventStreamResponse(StreamingResponse):
    """Server-sent events. Starlette stops iterating when the client disconnects; whatever ends the
    response, `close` then runs, so the engine request ends with it."""

    def __init__(self, stream: EventStream):
        super().__init__(stream.events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._close = stream.close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()


async def _respond(request: Request, work: Awaitable[BaseModel | EventStream]) -> Response:
    result = await _unless_disconnected(request, work)
    if result is None:
        return Response(status_code=499)  # nobody reads it; 499 is nginx's "client closed request"
    if isinstance(result, EventStream):
        return EventStreamResponse(result)
    return JSONResponse(result.model_dump(mode="json"))


async def _unless_disconnected(request: Request, work: Awaitable[BaseModel | EventStream]):
    """`work`'s result, or None if the client disconnected first. Then `work` is cancelled, which
    aborts its engine request: a non-streaming request would otherwise generate for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done
    return task.result() if task.done() else None


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- auth ---------------------------------------------------------------------------------------
class BearerAuth:
    """ASGI middleware: requests under /v1 must carry `Authorization: Bearer <api_key>` (the
    openai client's `api_key`). It runs before routing and parsing, so it answers first."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorized(scope):
            error = APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )
            response = _error_json(error, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = Headers(scope=scope).get("authorization", "").encode()
        return secrets.compare_digest(given, self._expected)  # constant time: no timing oracle


# ---- errors -------------------------------------------------------------------------------------
def _error_json(error: Exception, headers: dict | None = None) -> JSONResponse:
    status, body = error_response(error)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers a malformed request with 400 and its error JSON, not FastAPI's 422 list.
        problems = []
        for error in exc.errors():
            location = ".".join(str(part) for part in error["loc"] if part != "body")
            problems.append(f"{location}: {error['msg']}" if location else error["msg"])
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        param = ".".join(str(part) for part in first if part != "body") or None
        return _error_json(APIError(400, "; ".join(problems) or "invalid request", param=param))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error_json(APIError(exc.status_code, str(exc.detail)), headers=exc.headers)

    async def our_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_json(exc)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(APIError, our_error)
    app.add_exception_handler(Fp4ServeError, our_error)  # InvalidRequestError: 400; the rest: 500
    # Anything else is a bug: answered as a 500 in the same shape, then logged by uvicorn.
    app.add_exception_handler(Exception, our_error)


# ---- running it ---------------------------------------------------------------------------------
def run_server(
    engine_config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_names: list[str] | None = None,
) -> None:
    """Load the model, then serve it until interrupted."""
    import uvicorn

    from fp4serve.engine.engine import LLMEngine

    engine = LLMEngine(engine_config)
    names = served_model_names or _default_names(engine_config)
    async_engine = AsyncEngine(engine)
    try:
        app = build_app(async_engine, names, api_key)
        log.info("serving %s at http://%s:%d/v1", ", ".join(names), host, port)
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=5)
    finally:
        async_engine.shutdown()


def _default_names(config: EngineConfig) -> list[str]:
    """Without --served-model-name: the --model argument as typed (vLLM's rule)."""
    if config.model:
        return [config.model]
    from fp4serve.default_model import DEFAULT_MODEL_NAME

    return [DEFAULT_MODEL_NAME]
