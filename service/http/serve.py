"""`python -m service serve`: uvicorn with the limits of service/config.py, so they are part of how the
service starts rather than flags left to the reader.

uvicorn by itself waits for every open request before it tells the app to stop, so a full queue would
delay the exit for as long as the queue takes. `Server` starts the app's bounded drain (new work 503 at
once, queued work answered or refused within PUNKS_SHUTDOWN_TIMEOUT_S) as soon as the signal arrives.
"""

import argparse
import asyncio
import socket
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.config import Settings

GRACE_S = 2.0  # uvicorn's own deadline comes this much after the app's, so the refused requests get their 503


class Server(uvicorn.Server):
    """uvicorn.Server that starts the app's drain first (app.state.shutdown, see service/http/app.py)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(self.app.state.shutdown())
        await super().shutdown(sockets)
        await drain


class HeaderLimitedH11(H11Protocol):
    """uvicorn's h11 protocol, answering 431 (and closing) when the request line and headers outgrow
    h11_max_incomplete_event_size: h11 stops buffering there, so memory stays bounded. uvicorn's httptools protocol
    has no such limit (100 MiB of headers were read whole), and its h11 one answers a bare 400."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or h11._connection.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        if len(self.conn.trailing_data[0]) <= limit:  # another malformed request
            return super().send_400_response(msg)
        response = h11.Response(status_code=431, headers=[(b"content-type", b"text/plain"), (b"connection", b"close")])
        for event in (response, h11.Data(data=b"Request header fields too large"), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn settings the service runs with (the tests' servers use them too)."""
    options: dict[str, Any] = {  # keyword arguments of uvicorn.Config, each of its own type
        "host": settings.host,
        "port": settings.port,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.limit_concurrency,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s + GRACE_S,
        "lifespan": "on",
        "http": HeaderLimitedH11,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
    return uvicorn.Config(app, **options | overrides)


def main(args: argparse.Namespace) -> int:
    """`python -m service serve [--host H] [--port P]`: the PUNKS_* settings, these two overridable."""
    from service.http.app import create_app  # imports torch: only for this command

    overrides = {name: value for name in ("host", "port") if (value := getattr(args, name)) is not None}
    settings = Settings(**overrides)
    app = create_app(settings)
    Server(config(app, settings), app).run()
    return 0
