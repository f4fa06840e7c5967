"""`kimbho serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the generation engine.

    kimbho serve runs/small --port 8000 --api-key "$KEY"

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    client.completions.create(model="small", prompt="Once upon a time", max_tokens=32)

`protocol` holds the request shapes, `worker` the thread that owns the engine (continuous
batching, bounded queue, cancellation), `app` the routes, validation, auth and streaming, and
`playground.html` the page at `/`. FastAPI and uvicorn are an optional extra
(`pip install 'kimbho[serve]'`), imported only here.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import KimbhoError

log = logging.getLogger("kimbho")

API_KEY_ENV = "KIMBHO_API_KEY"


def require_server_dependencies() -> None:
    """A clear error, rather than an ImportError, when the `serve` extra is not installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise KimbhoError(
            f"kimbho serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'kimbho[serve]'"
        ) from None


def build_app(
    model_path: str | os.PathLike[str],
    api_key: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    index: str | None = None,
    retriever: str = "bm25",
    **options: object,
) -> Any:
    """The FastAPI application serving `model_path` (run, checkpoint or Hugging Face directory)
    on `device` in `dtype` (as `kimbho.load` takes them), answering from the documents of
    `index` (through the retriever named `retriever`) when given. `api_key` defaults to
    $KIMBHO_API_KEY; `options` are `ServerOptions` fields (model_name, slots, max_queue, timeout,
    max_body_bytes, max_len, k)."""
    require_server_dependencies()
    from ..inference.chat import ChatFormat
    from ..loading import load, resolve_checkpoint
    from ..retrieval import open_retriever
    from .app import ServerOptions, create_app

    # The index first: a missing or corrupt one is reported before the model loads.
    found = open_retriever(index, retriever) if index is not None or retriever != "bm25" else None
    model, tokenizer = load(model_path, device=device, dtype=dtype)
    chat = ChatFormat.for_model(tokenizer, resolve_checkpoint(model_path))
    options["model_name"] = options.get("model_name") or Path(model_path).resolve().name
    options["api_key"] = api_key or os.environ.get(API_KEY_ENV) or None
    return create_app(model, tokenizer, ServerOptions(**options), chat, found)  # type: ignore[arg-type]


def serve(
    model_path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    **options: object,
) -> None:
    """Serve `model_path` on host:port until interrupted; see `build_app` for the rest."""
    app = build_app(model_path, api_key, device, dtype, **options)  # type: ignore[arg-type]
    import uvicorn

    settings, chat = app.state.options, app.state.chat
    if not settings.api_key and not _is_loopback(host):
        log.warning(f"serving on {host} without an API key: anyone who can reach it can use it (--api-key)")
    sock = listen(host, port)
    log.info(
        f"serving {settings.model_name} on http://{host}:{sock.getsockname()[1]} (playground at /, API at /v1; "
        f"{'API key required' if settings.api_key else 'no API key'}; chat format: "
        f"{'none' if chat is None else 'chat_template' if chat.template else 'role tokens'})"
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Before uvicorn waits for open connections: streams in flight end with an error event
            # and [DONE] rather than being cut when the grace period runs out.
            app.state.begin_shutdown()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear error (port taken, unknown host); port 0 picks a free port."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise KimbhoError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
