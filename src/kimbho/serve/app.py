"""The FastAPI application: OpenAI's routes over the generation worker.

    GET  /v1/models            the served model
    POST /v1/completions       text (or token ids) in, continuations out
    POST /v1/chat/completions  messages in, the assistant's reply out
    POST /tokenize             text in, token ids out; POST /detokenize the reverse
    GET  /tokenizer_info       special tokens and chat template (with the two above: what
                               lm-evaluation-harness's remote tokenizer needs, as vLLM serves it)
    GET  /health               liveness, never behind the API key
    GET  /                     the playground page

Every request is checked before any generation starts; a bad one gets a 4xx with OpenAI's error
object naming the field (`{"error": {"message", "type", "param", "code"}}`), never a 5xx. With an
API key, every route but /health needs `Authorization: Bearer KEY`: the check is middleware in
front of the whole application, so no route (including /docs, /openapi.json and unknown paths)
can be added without it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from ..data.tokenizer import Tokenizer
from ..device import hand_over_cpu_threads
from ..inference.chat import ChatFormat
from ..inference.engine import Engine
from ..model import KimbhoV1Model
from ..retrieval import Retriever
from .auth import Guard
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    describe_validation_error,
    error_body,
)
from .service import DEFAULT_MAX_LEN, APIError, ServerOptions, Service
from .worker import Worker

log = logging.getLogger("kimbho")


def create_app(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    options: ServerOptions | None = None,
    chat_format: ChatFormat | None = None,
    retriever: Retriever | None = None,
) -> FastAPI:
    """The server for one model. The generation worker starts and stops with the application
    (its lifespan); `app.state.worker` exposes it (and its `stats`)."""
    options = options or ServerOptions()
    max_len = options.max_len or min(model.config.max_seq_len, DEFAULT_MAX_LEN)
    if max_len < model.config.max_seq_len and not options.max_len:
        log.info(
            f"slots hold {max_len:,} tokens of the model's {model.config.max_seq_len:,} (raise with --max-len)"
        )
    engine = Engine(model, tokenizer, slots=options.slots, max_len=max_len)
    # The model was built on this thread and is decoded on the worker's: one pool of CPU threads.
    hand_over_cpu_threads()
    worker = Worker(engine, options.max_queue)
    augmenter = None
    if retriever is not None:
        from ..retrieval.augment import Augmenter

        augmenter = Augmenter(retriever, options.k, tokenizer, chat_format, engine.max_len)
    service = Service(worker, tokenizer, chat_format, options, augmenter)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(
        title="Kimbho",
        summary="OpenAI-compatible completions and chat over a Kimbho model",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.worker, app.state.options, app.state.chat = worker, options, chat_format
    app.state.begin_shutdown = service.begin_shutdown

    def openapi() -> dict[str, Any]:
        """The generated schema, with `model` narrowed to the one model served here."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                field = schema["components"]["schemas"][name]["properties"]["model"]
                field["anyOf"] = [{"type": "string", "enum": [options.model_name]}, {"type": "null"}]
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(Guard, api_key=options.api_key, max_body_bytes=options.max_body_bytes)

    _add_error_handlers(app)
    _add_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error object: 4xx for the client's mistakes, 500 (logged) for ours."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, param = describe_validation_error(exc.errors())
        return JSONResponse(error_body(message, param), status_code=status)

    @app.exception_handler(APIError)
    async def refused(request: Request, exc: APIError) -> JSONResponse:
        code = "rate_limit_exceeded" if exc.status == 429 else None
        return JSONResponse(error_body(exc.message, exc.param, exc.type, code), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), None, kind), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # never a user's mistake: logged
        log.error("request failed", exc_info=exc)
        return JSONResponse(error_body(f"internal error: {exc}", None, "server_error"), status_code=500)


def _add_routes(app: FastAPI, service: Service) -> None:
    """OpenAI's routes (each a call into `service`), /health and the playground page."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model_card(model_id: str) -> dict[str, Any]:
        service.check_model(model_id)
        return service.model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await service.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await service.chat(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await service.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return service.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return service.tokenizer_info()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("playground.html").read_text())


def _version() -> str:
    from .. import __version__

    return __version__
