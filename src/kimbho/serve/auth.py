"""What stands in front of every route: the API key and the request body size limit.

It is ASGI middleware around the whole application, not a dependency of some routes, so no route
(the playground, /docs, /openapi.json, unknown paths) can be added without it: only /health is
open, for load balancers. The key is compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import binascii
import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_body


class Guard:
    """ASGI middleware in front of every route: the API key (all but /health) and the body
    size limit (the body is read here, up to the limit, and handed on)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"] != "/health" and not self._authorized(scope):
            challenge = {"WWW-Authenticate": 'Basic realm="kimbho"' if scope["path"] == "/" else "Bearer"}
            reason = "a valid API key is required: send the header Authorization: Bearer KEY"
            response = JSONResponse(
                error_body(reason, None, "authentication_error", "invalid_api_key"), 401, challenge
            )
            await response(scope, receive, send)
            return
        headers: dict[bytes, bytes] = dict(scope["headers"])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        too_large = JSONResponse(
            error_body(f"the request body is larger than the server's limit of {self.max_body_bytes} bytes"),
            413,
        )
        if declared > self.max_body_bytes:
            await too_large(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the disconnect, when it comes

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credentials = value.partition(b" ")
        if (
            scheme.lower() == b"basic"
        ):  # a browser's login prompt for the playground: any user, the key as password
            try:
                credentials = base64.b64decode(credentials, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self.api_key)
