"""Listeners on loopback that stand in for what a download must never trust: an internal host (a canary that
records every connection), a host that redirects elsewhere, a slow sender, a huge body. Every loop is bounded.

Loopback is one /8 on Linux: the "public" file server of the Cog tests listens on 127.0.0.2, which their
deployment allows (PUNKS_DOWNLOAD_ALLOWED_NETWORKS), while the canaries listen on 127.0.0.1, which it does not.
"""

import http.server
import ipaddress
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

from service.weights.policy import DownloadPolicy

ALLOWED_HOST = "127.0.0.2"  # stands in for a public host
INTERNAL_HOST = "127.0.0.1"  # stands in for an internal one
ALLOWED_NETWORKS_ENV = f'["{ALLOWED_HOST}/32"]'
# The policy of the deployment under test: http, and the one allowed loopback address.
TEST_POLICY = DownloadPolicy(allow_http=True, allowed_networks=(ipaddress.ip_network(f"{ALLOWED_HOST}/32"),))


class Canary:
    """A TCP listener that accepts and records connections, answering nothing (an internal service, an FTP server)."""

    def __init__(self, host: str = INTERNAL_HOST):
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.hits += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextmanager
def canary(host: str = INTERNAL_HOST) -> Iterator[Canary]:
    listener = Canary(host)
    try:
        yield listener
    finally:
        listener.close()


class _Hostile(http.server.BaseHTTPRequestHandler):
    """/redirect?to=URL: 302 to URL (percent-decoded, so any character); /slow: 1 byte every `slow_every_s` of an
    endless body; /huge: a body of `huge_bytes` zeros, counting what was sent."""

    slow_every_s = 20.0
    huge_bytes = 800 * 1024 * 1024
    stats: "Stats"

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(query.removeprefix("to=")))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self._dribble()
        elif path.startswith("/huge"):
            self.send_response(200)
            if path == "/huge":  # the honest one says how long it is; /huge-chunked does not
                self.send_header("Content-Length", str(self.huge_bytes))
            self.end_headers()
            self._zeros()
        else:
            self.send_error(404)

    def _dribble(self) -> None:
        with self.stats.lock:
            self.stats.dribbling += 1
        try:
            for _ in range(100):  # at most 100 bytes: the server thread ends even if nobody hangs up
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(self.slow_every_s)
        except OSError:
            return
        finally:
            with self.stats.lock:
                self.stats.dribbling -= 1

    def _zeros(self) -> None:
        block, sent = b"\0" * (1 << 20), 0
        self.stats.sent.append(0)
        while sent < self.huge_bytes:
            try:
                self.wfile.write(block)
            except OSError:
                return
            sent += len(block)
            self.stats.sent[-1] = sent

    def log_message(self, *args: object) -> None:
        pass


class Stats:
    """What a hostile server did: bytes sent per /huge request, /slow responses still sending."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.dribbling = 0
        self.lock = threading.Lock()


@contextmanager
def hostile_server(host: str = ALLOWED_HOST, slow_every_s: float = 20.0) -> Iterator[tuple[str, Stats]]:
    """(base URL, what it did)."""
    stats = Stats()
    handler = type("Handler", (_Hostile,), {"slow_every_s": slow_every_s, "stats": stats})
    httpd = http.server.ThreadingHTTPServer((host, 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}", stats
    finally:
        httpd.shutdown()
        httpd.server_close()
