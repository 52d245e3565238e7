"""Plain ASGI middleware: they must see every response, including those no route produced (413, 404)."""

import asyncio
import ipaddress
import time
from collections.abc import Callable, Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.metrics import Metrics

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# What a middleware answers by itself, in the error shape of the API the path belongs to (service/http/app.py):
# (path, status, error type, message, headers) -> the response.
ErrorResponder = Callable[[str, int, str, str, dict[str, str]], Response]
# Every response: no MIME sniffing, no framing, no referrer; and, unless a route set its own (the API docs), a
# Content-Security-Policy that lets a page load only the app's own scripts, styles and connections.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'; object-src 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class BodyLimit:
    """413 for a body over max_bytes: on its Content-Length, and on the bytes actually sent (a chunked
    body has no Content-Length). The body is read here, at most max_bytes of it, and replayed to the app.

    408 and a closed connection for a body not complete within timeout_s: uvicorn would wait for the rest
    forever, and a few thousand such connections exhaust the file descriptors."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float,
        respond: ErrorResponder,
        image_paths: tuple[str, ...] = (),
        max_image_bytes: int = 0,
    ):
        """`image_paths`: the routes that take an image, whose bodies may have up to max_image_bytes."""
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.respond = respond
        self.image_paths = image_paths
        self.max_image_bytes = max_image_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_image_bytes if scope["path"] in self.image_paths else self.max_bytes
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await self._reject(scope, receive, send, limit)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        return await self._reject(scope, receive, send, limit)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            reason = f"Body not received within {self.timeout_s:g}s"
            response = self.respond(scope["path"], 408, "timeout", reason, {"Connection": "close"})
            return await response(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        message = f"Body larger than {limit} bytes"
        await self.respond(scope["path"], 413, "too_large", message, {})(scope, receive, send)


class LoopbackHosts:
    """Without a token and without PUNKS_TRUSTED_HOSTS: a request that arrived on a loopback address must name a
    loopback host. A web page elsewhere can make a browser's own name resolve to 127.0.0.1 (DNS rebinding) and then
    read a tokenless local server; its requests carry that name. Requests arriving on other addresses are not
    restricted, however the server was started (uvicorn, `serve`, Ray Serve)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived_on = (scope.get("server") or ("",))[0]
        if scope["type"] == "http" and _is_loopback(arrived_on):
            named = _host_name(Headers(scope=scope).get("host", ""))
            if not _is_loopback(named):
                return await PlainTextResponse("Invalid host header", 400)(scope, receive, send)
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name in a Host header value: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.partition(":")[0]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SecurityHeaders:
    """SECURITY_HEADERS and the CSP on every response, including those no route produced."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = CSP
            await send(message)

        await self.app(scope, receive, secured)


class RequestMetrics:
    """Count every answer by route template (not raw path, so unknown URLs cannot explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routers: Sequence[Router]):
        """`routers`: the app's own and those it includes (FastAPI keeps an included router as one entry of the
        app's routes), to name answers no route gave (413, 408) and the plain Starlette routes (/openapi.json),
        which do not set scope["route"]."""
        self.app = app
        self.metrics = metrics
        self.routers = routers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"  # clients choose the method
            route = getattr(scope.get("route"), "path", None) or self._route_of(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)

    def _route_of(self, scope: Scope) -> str:
        for router in self.routers:
            for route in router.routes:
                path = getattr(route, "path", None)  # an included router has none: its own routes are listed
                if path is not None and route.matches(scope)[0] == Match.FULL:
                    return str(path)
        return "unmatched"
