"""What an HTTP server of this repository needs besides its routes: OpenAI's error shape and the handlers that answer
every failure in it, guards that answer before a request's body is read (Host header, API key, body size, a
deadline for the request head), a watch for clients that leave, and a shutdown that lets the running request
finish."""
import asyncio
import contextlib
import secrets
from typing import Callable, Dict, List, Optional

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_MAX_BODY_BYTES = 1 << 20
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]", "::1"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                   headers=None, code: Optional[str] = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class ApiError(Exception):
    """A request the server answers with an error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                 headers: Optional[Dict[str, str]] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers
        self.code = code  # OpenAI's machine-readable reason (context_length_exceeded, model_not_found)


class ClientGone(Exception):
    """The client closed its connection before its (non-streaming) reply was ready."""


async def unless_disconnected(connection: Request, work):
    """Awaits `work` unless the client disconnects first: then `work` is cancelled and ClientGone raised.
    Once the body has been read, the next ASGI receive() returns only when the client disconnects."""
    async def disconnected():
        while (await connection.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answered in OpenAI's shape: ApiError as it says, a client gone 499, a body the schema rejects
    422 naming the fields, an unreadable body 400, other HTTP errors as they are, anything else 500."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.param, error.kind, error.headers, error.code)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):  # nobody reads it; logged and counted as such
        return error_response(499, "the client closed the connection before its reply was ready", kind="client_closed")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = error.errors()
        if problems[0]["type"] == "json_invalid":
            try:
                (await request.body()).decode("utf-8")
            except UnicodeDecodeError as bad:
                return error_response(422, f"body: not UTF-8 (byte {bad.start}); JSON bodies must be UTF-8", "body")

        def where(problem) -> str:
            if problem["type"] == "json_invalid":  # its loc is the character offset
                return "body"
            return ".".join(str(part) for part in problem["loc"] if part != "body") or "body"

        def what(problem) -> str:
            if problem["type"] == "json_invalid":
                return f"invalid JSON at character {problem['loc'][-1]}: {problem['ctx']['error']}"
            return problem["msg"]

        message = "; ".join(f"{where(p)}: {what(p)}" for p in problems)
        return error_response(422, message, where(problems[0]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        if error.status_code == 400 and "parsing the body" in str(error.detail):  # FastAPI's words for it
            return error_response(400, "body: cannot be read as JSON (it is not UTF-8, or it nests too deeply)",
                                  "body")
        return error_response(error.status_code, str(error.detail), "body" if error.status_code == 413 else None,
                              headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):  # uvicorn logs the traceback
        return error_response(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")


class RequestGuard:
    """ASGI middleware that answers, before the application reads a byte of the body: a Host header this
    server does not answer to (400), a missing or wrong API key (401, on every path), and a body longer
    than max_body_bytes (413, by Content-Length or while it streams in)."""

    def __init__(self, app, api_key: Optional[str], allowed_hosts: Optional[List[str]], max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None or "*" in allowed_hosts else \
            {host.lower() for host in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.allowed_hosts is not None and name.lower() not in self.allowed_hosts:
            return await error_response(400, f"Host {host!r} is not one this server answers to; start it with "
                                             "--allowed-hosts to add names", "host")(scope, receive, send)
        if self.api_key is not None and scope["path"] != "/health":  # probes carry no key
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                                 "<key>'", kind="authentication_error",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await self.too_large()(scope, receive, send)
        received = 0

        async def bounded_receive():  # a body without Content-Length (chunked) that grows past the limit
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, self.too_large_message())  # answered by the app's handler
            return message

        await self.app(scope, bounded_receive, send)

    def too_large_message(self) -> str:
        return f"the request body is over {self.max_body_bytes} bytes (--max-body-bytes)"

    def too_large(self):
        return error_response(413, self.too_large_message(), "body")


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head: a connection that has not sent a whole
    request line and headers within `seconds` (of connecting, or of its last response) is closed, so that
    clients sending headers a byte at a time cannot hold connections forever."""
    seconds = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        self.head_deadline = self.loop.call_later(self.seconds, self.timeout_keep_alive_handler)

    def _disarm_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's head is complete
            self._disarm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._disarm_deadline()
            self._arm_deadline()

    def connection_lost(self, exc) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that calls on_exit first on SIGTERM (or Ctrl-C): the application then refuses what
    it has not started (api.py answers its queued requests 503) while uvicorn lets the running ones finish."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
