"""The HTTP server: routes, every error as OpenAI error JSON, client disconnects, and `run_server`,
which loads the engine and runs uvicorn.

Library use (the benchmark client starts servers in-process):

    build_app(async_engine, served_model_names, api_key=None, options=None) -> FastAPI
    run_server(engine_config, host="127.0.0.1", port=8000, api_key=None, served_model_names=None,
               options=None)   # blocks until interrupted

Routes only resolve the model name and hand the parsed request to chat.py, completions.py or
tokenize.py, which return a response model or an EventStream; this module turns either into HTTP. A
client that goes away cancels its handler (non-streaming) or its stream, and both paths abort the
engine request. Auth (auth.py) and the body size limit (limits.py) are ASGI middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import signal
import sys
import threading
import time
from collections.abc import Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from fp4serve import __version__
from fp4serve.config import EngineConfig
from fp4serve.engine.async_engine import AsyncEngine
from fp4serve.engine.grammar import GrammarCompiler
from fp4serve.errors import Fp4ServeError
from fp4serve.server.auth import BearerAuth
from fp4serve.server.chat import create_chat_completion
from fp4serve.server.choices import check_num_choices
from fp4serve.server.completions import create_completion
from fp4serve.server.limits import BodySizeLimit
from fp4serve.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fp4serve.server.metrics import metrics_registry, render
from fp4serve.server.options import ServerOptions
from fp4serve.server.prompt_work import PromptWork
from fp4serve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    EventStream,
    ModelCard,
    ModelList,
    error_json,
)
from fp4serve.server.responses import create_response, stored_response
from fp4serve.server.responses_protocol import ResponseDeleted, ResponseObject, ResponsesRequest
from fp4serve.server.responses_store import ResponseStore
from fp4serve.server.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    detokenize,
    tokenize,
    tokenizer_info,
)

log = logging.getLogger(__name__)


def build_app(
    async_engine: AsyncEngine,
    served_model_names: list[str],
    api_key: str | None = None,
    options: ServerOptions | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over a running AsyncEngine. The first served name is the default
    for requests that name no model; every name is an alias of the one model. `options` holds the
    server-only flags (parsers, queue and body limits); None: their defaults."""
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    options = options or ServerOptions()
    work = PromptWork(async_engine.tokenizer, async_engine.max_model_len)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        work.shutdown()

    app = FastAPI(title="fp4serve", summary="OpenAI-compatible LLM server", version=__version__, lifespan=lifespan)
    _install_error_handlers(app)
    _document_only_errors_sent(app)
    # Added last = runs first: a too-large body is refused even before the key is checked.
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(BodySizeLimit, max_bytes=options.max_request_body_size)
    auth = _errors(401) if api_key else {}
    _add_status_routes(app, async_engine, served_model_names, auth)
    engine = async_engine.engine
    # One compiler for every route: it indexes the vocabulary on first use (seconds for a large one).
    grammars = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)
    _add_generation_routes(app, async_engine, served_model_names, options, auth, work, grammars)
    _add_responses_routes(app, async_engine, served_model_names, options, auth, work, grammars)
    _add_tokenizer_routes(app, async_engine, served_model_names, auth, work, options)
    return app


def _add_status_routes(app: FastAPI, async_engine: AsyncEngine, served_model_names: list[str], auth: dict) -> None:
    """/health, /version, /metrics, /v1/models."""
    registry = metrics_registry(async_engine.engine, served_model_names[0])

    # The documented bodies are those sent: /health has none, /metrics is Prometheus text.
    no_body = {200: {"description": "The engine is running", "content": {}}}

    @app.get("/health", response_class=Response, responses=no_body | _errors(503, 500))
    async def health() -> Response:
        if not async_engine.is_running:
            return error_json(APIError(503, "the engine is not running"))
        return Response(status_code=200)

    @app.get("/version", responses=_errors(500))
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse, responses=auth | _errors(500))
    async def metrics() -> Response:
        return Response(render(registry), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models", responses=auth | _errors(500))
    async def models() -> ModelList:
        root = str(async_engine.engine.model_path)
        cards = [ModelCard(id=name, root=root, max_model_len=async_engine.max_model_len) for name in served_model_names]
        return ModelList(data=cards)


def _add_generation_routes(
    app: FastAPI,
    async_engine: AsyncEngine,
    served_model_names: list[str],
    options: ServerOptions,
    auth: dict,
    work: PromptWork,
    grammars: GrammarCompiler,
) -> None:
    """/v1/completions and /v1/chat/completions."""
    errors = _errors(400) | auth | _errors(404, 413, 503, 500)

    @app.post("/v1/completions", responses=_answer(CompletionResponse) | errors)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = _resolve_model(served_model_names, body.model)
        _check_queue(async_engine, options, _num_choices(async_engine, options, body.num_prompts, body.n))
        return await _respond(request, create_completion(async_engine, body, model, work))

    @app.post("/v1/chat/completions", responses=_answer(ChatCompletionResponse) | errors)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = _resolve_model(served_model_names, body.model)
        _check_queue(async_engine, options, _num_choices(async_engine, options, 1, body.n))
        return await _respond(request, create_chat_completion(async_engine, body, model, options, work, grammars))


def _add_responses_routes(
    app: FastAPI,
    async_engine: AsyncEngine,
    served_model_names: list[str],
    options: ServerOptions,
    auth: dict,
    work: PromptWork,
    grammars: GrammarCompiler,
) -> None:
    """/v1/responses (OpenAI's Responses API) and its stored responses (docs/serving.md)."""
    store = ResponseStore(options.responses_store_size)
    errors = _errors(400) | auth | _errors(404, 413, 503, 500)

    @app.post("/v1/responses", responses=_answer(ResponseObject) | errors)
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        model = _resolve_model(served_model_names, body.model)
        _check_queue(async_engine, options, 1)
        return await _respond(request, create_response(async_engine, body, model, options, work, grammars, store))

    @app.get("/v1/responses/{response_id}", responses=auth | _errors(404, 500))
    async def get_response(response_id: str) -> ResponseObject:
        return stored_response(store, response_id)

    @app.delete("/v1/responses/{response_id}", responses=auth | _errors(404, 500))
    async def delete_response(response_id: str) -> ResponseDeleted:
        stored_response(store, response_id)  # 404 for an unknown id
        store.delete(response_id)
        return ResponseDeleted(id=response_id)


def _add_tokenizer_routes(
    app: FastAPI,
    async_engine: AsyncEngine,
    served_model_names: list[str],
    auth: dict,
    work: PromptWork,
    options: ServerOptions,
) -> None:
    """/tokenize, /detokenize, and /tokenizer_info when enabled."""
    responses = _errors(400) | auth | _errors(404, 413, 500)

    @app.post("/tokenize", responses=responses)
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        _resolve_model(served_model_names, body.model)
        return await tokenize(async_engine, body, work)

    @app.post("/detokenize", responses=responses)
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        _resolve_model(served_model_names, body.model)
        return detokenize(async_engine, body)

    if options.enable_tokenizer_info_endpoint:

        @app.get("/tokenizer_info", responses=auth | _errors(404, 500))
        async def tokenizer_info_route() -> TokenizerInfoResponse:
            return tokenizer_info(async_engine.tokenizer)


def _resolve_model(served_model_names: list[str], requested: str | None) -> str:
    """The served name a request asked for; no name: the first."""
    if not requested:
        return served_model_names[0]
    if requested not in served_model_names:
        raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")
    return requested


def _num_choices(async_engine: AsyncEngine, options: ServerOptions, num_prompts: int, n: int) -> int:
    return check_num_choices(num_prompts, n, options.max_queue, async_engine.engine.scheduler.max_num_seqs)


def _check_queue(async_engine: AsyncEngine, options: ServerOptions, num_choices: int) -> None:
    """--max-queue bounds the requests that would wait, each choice (engine request) counted: one
    the engine can start at once (a free sequence slot) does not count."""
    if options.max_queue is not None and async_engine.num_queued(num_choices) > options.max_queue:
        raise APIError(
            503,
            f"the server is busy: {options.max_queue} requests are already waiting; retry shortly",
            code="server_busy",
            headers={"Retry-After": "1"},
        )


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


# ---- errors -------------------------------------------------------------------------------------
ERROR_MEANINGS = {
    400: "Invalid request: a field of the wrong type or out of range (`param` names it)",
    401: "Incorrect or missing API key",
    404: "No such model (or stored response)",
    413: "Request body larger than --max-request-body-size",
    503: "The server is busy (--max-queue; see Retry-After); /health: the engine is not running",
    500: "Internal error; the message carries an id to find it in the server log",
}


def _answer(model: type[BaseModel]) -> dict:
    """OpenAPI `responses` for a generation route's 200: the whole answer, or with "stream": true
    server-sent events, each a chunk of it."""
    return {200: {"model": model, "description": "The answer", "content": {"text/event-stream": {}}}}


def _errors(*statuses: int) -> dict:
    """OpenAPI `responses` for these statuses, all with OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]} for status in statuses}


def _document_only_errors_sent(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body; this server answers those with 400."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def _install_error_handlers(app: FastAPI) -> None:
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers a malformed request with 400 and its error JSON, not FastAPI's 422 list.
        problems, params = [], []
        for error in exc.errors():
            path = None if error["type"] == "json_invalid" else field_path(exc.body, error)
            if path is None:
                problems.append(f"the request body is not a JSON object ({error['msg']})")
            else:
                problems.append(f"{path}: {error['msg']}")
            params.append(path)
        param = _deepest_within_first(params)
        return error_json(APIError(400, "; ".join(dict.fromkeys(problems)) or "invalid request", param=param))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # The router's own 404 and 405 (a path or method not served) name the request, in OpenAI's words.
        asked = f"({request.method} {request.url.path})"
        if exc.status_code == 404:
            message = f"Invalid URL {asked}"
        elif exc.status_code == 405:
            message = f"Invalid method for URL {asked}: it accepts {(exc.headers or {}).get('Allow', 'another method')}"
        else:
            message = str(exc.detail)
        return error_json(APIError(exc.status_code, message), headers=exc.headers)

    async def our_error(request: Request, exc: Exception) -> JSONResponse:
        return error_json(exc)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(APIError, our_error)
    app.add_exception_handler(Fp4ServeError, our_error)  # InvalidRequestError: 400; the rest: 500
    # Anything else is a bug: answered as a 500 in the same shape, then logged by uvicorn.
    app.add_exception_handler(Exception, our_error)


def _deepest_within_first(paths: list[str | None]) -> str | None:
    """The first error's field; when a union's alternatives failed deeper inside it (content is
    neither a string nor valid parts), the deepest of those, which says what to fix."""
    first = paths[0] if paths else None
    if first is None:
        return None
    return max((p for p in paths if p and p.startswith(first)), key=len)


def field_path(body, error: dict) -> str | None:
    """The field a pydantic error is about, as "messages[0].content", or None for the body itself.
    A location also holds pydantic's union tags ("str", "list[ContentPart]"); walking the body
    along it keeps only the parts that are really there (and a missing field's name)."""
    path, node = "", body
    for part in error["loc"][1:]:  # [0] is "body"
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict) and (part in node or error["type"] == "missing"):
            path, node = f"{path}.{part}" if path else part, node.get(part)
    return path or None


# ---- running it ---------------------------------------------------------------------------------
def run_server(
    engine_config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_names: list[str] | None = None,
    options: ServerOptions | None = None,
    started: float | None = None,
) -> None:
    """Load the model, then serve it until interrupted. started: time.perf_counter() when the
    command began, for the start-up log."""
    import uvicorn

    from fp4serve.engine.engine import LLMEngine

    options = options or ServerOptions()
    if engine_config.trust_remote_code:
        log.info("--trust-remote-code: accepted for vLLM compatibility; fp4serve runs no code from model directories")
    engine = LLMEngine(engine_config)
    names = served_model_names or _default_names(engine_config)
    # The engine loop stays on this thread, which loaded the model, and HTTP gets a thread of its
    # own (AsyncEngine says why); Ctrl-C reaches this thread and stops both.
    async_engine = AsyncEngine(engine, in_this_thread=True)
    app = build_app(async_engine, names, api_key, options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5))
    failed = []

    def serve_http() -> None:
        try:
            server.run()
        except BaseException as e:  # uvicorn exits with SystemExit when it cannot bind
            failed.append(e)
        finally:
            async_engine.shutdown()

    http = threading.Thread(target=serve_http, name="fp4serve-http", daemon=True)
    http.start()
    if started is not None:
        log.info("engine ready %.2f s after the command started; HTTP is starting", time.perf_counter() - started)
    print(ready_message(host, port, names[0], api_key is not None), file=sys.stderr, flush=True)

    def stop(signum, frame):  # SIGTERM as Ctrl-C: a graceful stop, as uvicorn gives on the main thread
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        async_engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        async_engine.shutdown()
        http.join(timeout=10)
    if failed or not server.started:
        raise SystemExit(1)


def ready_message(host: str, port: int, model: str, with_key: bool) -> str:
    """The URL and a curl line that works as pasted."""
    url_host = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
    base = f"http://{url_host}:{port}"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    auth = ' -H "Authorization: Bearer $FP4SERVE_API_KEY"' if with_key else ""
    return (
        f"fp4serve: serving {model} at {base}/v1\n"
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"
    )


def _default_names(config: EngineConfig) -> list[str]:
    """The model argument as typed (vLLM's rule), or the embedded default model's name."""
    if config.model:
        return [config.model]
    from fp4serve.default_model import DEFAULT_MODEL_NAME

    return [DEFAULT_MODEL_NAME]
