"""The one download policy: what a URL download may reach, for how long and how much. Every file the service
fetches goes through `stream`: a caller's `lora_weights` (service/weights/fetch.py) and Cog's `image` and
`input_images` (service/weights/inputs.py) with the strict policy, the operator's own URLs (`weights download`,
PUNKS_WEIGHTS_URLS) with the looser host rule of `for_operator`.

- Schemes: https only (http when PUNKS_DOWNLOAD_ALLOW_HTTP is on, or for the operator); redirects are followed
  by hand, at most MAX_REDIRECTS, never from https down to http and never to any other scheme.
- Hosts: every address the host name resolves to must be public: loopback, private, link-local, CGNAT,
  multicast, reserved and unspecified addresses are refused, IPv4 and IPv6 (IPv4-mapped, 6to4 and NAT64
  addresses by the IPv4 address inside). The check runs where the connection is made (the HTTP client's network
  backend), on the first URL and every redirect, and the socket connects to the very address that was checked,
  so a DNS answer that changes between check and connect (DNS rebinding) changes nothing. Networks listed in
  PUNKS_DOWNLOAD_ALLOWED_NETWORKS are exempt (an internal mirror).
- Time: a connect timeout, a stall timeout between bytes, an overall deadline and a minimum average rate once
  the stall timeout has passed; a cancel event is checked between chunks (so a cancelled download stops within
  the stall timeout at most).
- Size: a cap checked on Content-Length before the body and on the bytes as they arrive.

Errors (DownloadError) name the URL's host and the rule that refused it; never an address, errno, or what a
refused host said.
"""

import ipaddress
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpcore
import httpx

from service.config import DownloadSettings
from service.weights.files import format_size

MAX_REDIRECTS = 5
USER_AGENT = "bespoke-punks-fetch"
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


class DownloadError(RuntimeError):
    """A download refused or failed; the message names the host and the rule, nothing the host said."""


class DownloadCancelled(DownloadError):
    """The caller stopped wanting the file (its prediction was cancelled)."""


@dataclass(frozen=True)
class DownloadPolicy:
    allow_http: bool = False
    public_hosts_only: bool = True
    allowed_networks: tuple[IpNetwork, ...] = ()  # exempt from public_hosts_only
    max_bytes: int = 256 * 1024 * 1024
    connect_timeout_s: float = 10.0
    stall_timeout_s: float = 10.0  # longest wait for the next bytes
    deadline_s: float = 120.0  # for the whole download, redirects included
    min_bytes_per_s: int = 64 * 1024  # average, checked once stall_timeout_s has passed
    trust_env: bool = False  # proxies and certificates from the environment (the operator's own downloads)

    @classmethod
    def for_settings(cls, settings: DownloadSettings) -> "DownloadPolicy":
        """The strict policy of run-time downloads (a caller's URLs), from the PUNKS_DOWNLOAD_* settings."""
        return cls(
            allow_http=settings.download_allow_http,
            allowed_networks=tuple(
                ipaddress.ip_network(text, strict=False) for text in settings.download_allowed_networks
            ),
            max_bytes=settings.download_max_bytes,
            connect_timeout_s=settings.download_connect_timeout_s,
            stall_timeout_s=settings.download_stall_timeout_s,
            deadline_s=settings.download_deadline_s,
            min_bytes_per_s=settings.download_min_bytes_per_s,
        )

    def for_operator(self, max_bytes: int = 16 * 1024**3, deadline_s: float = 6 * 3600.0) -> "DownloadPolicy":
        """The operator types these URLs (weights download, PUNKS_WEIGHTS_URLS): http and internal hosts allowed,
        proxies from the environment, room for a 2 GB checkpoint; the timeouts and the rate floor stay."""
        return replace(
            self, allow_http=True, public_hosts_only=False, max_bytes=max_bytes, deadline_s=deadline_s, trust_env=True
        )

    def check_url(self, url: str, previous: str | None = None) -> str:
        """The URL's host when its scheme is allowed (DownloadError otherwise); `previous`: the URL redirecting."""
        if not is_requestable(url):
            if previous is not None:
                raise DownloadError(
                    f"{_shown_host(previous)}: redirect to an invalid URL (its host, port or characters)"
                )
            raise DownloadError("the URL: not a valid URL (its host, port or characters)")
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if previous is not None and parts.scheme not in ("https", "http"):
            raise DownloadError(f"{_shown_host(previous)}: redirect to a non-http(s) URL refused")
        if parts.scheme not in ("https", "http") or not host:
            raise DownloadError(f"{_shown_host(url)}: only https:// URLs are fetched")
        if parts.scheme == "http":
            if previous is not None and urllib.parse.urlsplit(previous).scheme == "https":
                raise DownloadError(f"{_shown_host(previous)}: redirect from https to http refused")
            if not self.allow_http:
                raise DownloadError(f"{host}: only https:// URLs are fetched (PUNKS_DOWNLOAD_ALLOW_HTTP is off)")
        return host

    def refusal(self, address: IpAddress) -> str | None:
        """Why a connection to `address` is refused (None: allowed)."""
        if not self.public_hosts_only or any(address in network for network in self.allowed_networks):
            return None
        kind = address_kind(address)
        return None if kind == "public" else kind


def is_requestable(url: str) -> bool:
    """Whether the HTTP client can request `url` at all. It cannot with a port out of range, a broken IPv6 address, a
    control character or a host name IDNA refuses, and would raise an error of its own kind for each."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  # raises for a port out of range
        (parts.hostname or "").encode("idna")
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):  # UnicodeError (IDNA) is a ValueError
        return False
    return True


def address_kind(address: IpAddress) -> str:
    """'public', or the kind of non-public address (by the IPv4 address inside a mapped/6to4/NAT64 one)."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = (
            address.ipv4_mapped
            or address.sixtofour
            or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None)
        )
        if inner is not None:
            return address_kind(inner)
    for kind, matches in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("shared (CGNAT)", isinstance(address, ipaddress.IPv4Address) and address in CGNAT),
        ("private", address.is_private or not address.is_global),
    ):
        if matches:
            return kind
    return "public"


class _CheckedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses the policy allows: the host is resolved here, every
    address it resolves to is checked, and the socket connects to a checked address (no second lookup)."""

    def __init__(self, policy: DownloadPolicy):
        self.policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise DownloadError(f"{host}: the host name could not be resolved") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found))
        for address in addresses:
            if kind := self.policy.refusal(address):
                raise DownloadError(f"{host}: refused, not a public address ({kind}); only public hosts are fetched")
        for address in addresses[:-1]:
            try:
                return super().connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue
        return super().connect_tcp(str(addresses[-1]), port, timeout, local_address, socket_options)


class _CheckedTransport(httpx.HTTPTransport):
    def __init__(self, policy: DownloadPolicy):
        super().__init__(trust_env=policy.trust_env, retries=0)
        # httpx takes no network backend of its own; its connection pool does (httpx and httpcore are pinned, and
        # the tests fail if the check stops running: they fetch from loopback and expect a refusal).
        self._pool._network_backend = _CheckedBackend(policy)


class DownloadStatusError(DownloadError):
    """The host answered with an HTTP error status (kept for the caller: 416 means a resume must start over)."""

    def __init__(self, host: str, status: int):
        super().__init__(f"{host}: answered HTTP {status}")
        self.status = status


@dataclass(frozen=True)
class _Clock:
    """The deadline, the rate floor and the cancel event of one download, checked between chunks."""

    policy: DownloadPolicy
    cancel: threading.Event | None
    started: float

    def check(self, host: str, done: int = 0) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadCancelled(f"{host}: download cancelled")
        elapsed = time.monotonic() - self.started
        if elapsed > self.policy.deadline_s:
            raise DownloadError(f"{host}: not finished within {self.policy.deadline_s:g} s; stopped")
        floor, grace = self.policy.min_bytes_per_s, self.policy.stall_timeout_s
        if elapsed > grace and done < floor * (elapsed - grace):
            raise DownloadError(f"{host}: slower than {format_size(floor)}/s; stopped")


@dataclass(frozen=True)
class Download:
    """The final response of a download (after redirects): its status and headers, and its body via `chunks`."""

    response: httpx.Response
    host: str
    clock: _Clock

    @property
    def total(self) -> int | None:
        """Content-Length, when the server sent one."""
        length = self.response.headers.get("content-length", "")
        return int(length) if length.isdigit() else None

    def chunks(self, already: int = 0) -> Iterator[bytes]:
        """The body, under the size cap (counting `already` bytes on disk), the deadline, the rate floor and the
        cancel event; the stall timeout is the HTTP client's read timeout."""
        cap, done = self.clock.policy.max_bytes, 0
        try:
            for chunk in self.response.iter_bytes():  # as the bytes arrive: every read is checked
                done += len(chunk)
                if already + done > cap:
                    raise DownloadError(f"{self.host}: larger than the {format_size(cap)} cap; stopped")
                self.clock.check(self.host, done)
                yield chunk
        except httpx.TimeoutException:
            stall = self.clock.policy.stall_timeout_s
            raise DownloadError(f"{self.host}: sent nothing for {stall:g} s; stopped") from None
        except httpx.TransportError:
            raise DownloadError(f"{self.host}: the connection broke off") from None


@contextmanager
def stream(
    url: str,
    policy: DownloadPolicy,
    headers: dict[str, str] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[Download]:
    """GET `url` under `policy`, following redirects by hand (each one checked), and yield the final 2xx response.
    DownloadStatusError for an HTTP error status, DownloadError for every refusal."""
    clock = _Clock(policy, cancel, time.monotonic())
    timeout = httpx.Timeout(policy.stall_timeout_s, connect=policy.connect_timeout_s)
    sent = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"} | (headers or {})
    with httpx.Client(transport=_CheckedTransport(policy), timeout=timeout, trust_env=policy.trust_env) as client:
        current, previous = url, None
        for _ in range(MAX_REDIRECTS + 1):
            host = policy.check_url(current, previous)
            clock.check(host)
            try:
                response = client.send(client.build_request("GET", current, headers=sent), stream=True)
            except httpx.TimeoutException:
                raise DownloadError(f"{host}: no answer within {policy.connect_timeout_s:g} s") from None
            except httpx.TransportError:
                raise DownloadError(f"{host}: could not connect") from None
            except (httpx.InvalidURL, ValueError):  # what is_requestable cannot foresee: a host name IDNA refuses
                raise DownloadError(f"{host}: not a valid URL (its host, port or characters)") from None
            try:
                if response.has_redirect_location:
                    previous, current = current, urllib.parse.urljoin(current, response.headers["location"])
                    if _shown_host(current) != host:
                        sent.pop("Authorization", None)  # a token is for the host it was given for
                    continue
                if response.status_code >= 400:
                    raise DownloadStatusError(host, response.status_code)
                download = Download(response, host, clock)
                if download.total is not None and download.total > policy.max_bytes:
                    raise DownloadError(
                        f"{host}: {format_size(download.total)} is over the {format_size(policy.max_bytes)} cap; "
                        "not fetched"
                    )
                yield download
                return
            finally:
                response.close()
        raise DownloadError(f"{_shown_host(url)}: more than {MAX_REDIRECTS} redirects")


def _shown_host(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or "the URL"
