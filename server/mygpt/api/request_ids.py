"""X-Request-Id: every response carries one, as OpenAI's do: the client's own when it sent a usable one
(a proxy's, say), a new one otherwise. The SDK shows it (`response._request_id`, `error.request_id`),
and the server's log lines written while the request is handled name it, so that a user's report
leads to the log."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("mygpt_request_id", default=None)
_USABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # anything else gets a new id: no header or log injection


class RequestIds:
    """ASGI middleware: the request's id in REQUEST_ID, and on its response's headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        rid = sent if _USABLE.fullmatch(sent) else f"req_{uuid.uuid4().hex}"
        # not reset afterwards: an unhandled error's 500 is answered outside this middleware (Starlette's
        # ServerErrorMiddleware), by a handler that reads it; each request runs in a task of its own
        REQUEST_ID.set(rid)
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestIdLogFilter(logging.Filter):
    """Gives each record `request`: " [<id>]" in a request's handling, "" elsewhere (the engine's thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request = f" [{rid}]" if rid else ""
        return True
