"""The download policy (service/weights/policy.py) against listeners on loopback: internal hosts refused directly
and on redirects, FTP never reached, https only by default, deadlines, the rate floor, the size cap, cancel."""

import ipaddress
import threading
import time
import urllib.parse

import pytest

from service.weights.policy import DownloadCancelled, DownloadError, DownloadPolicy, address_kind, stream
from tests.hostile_hosts import ALLOWED_HOST, INTERNAL_HOST, TEST_POLICY, canary, hostile_server


def fetch(url: str, policy: DownloadPolicy = TEST_POLICY, cancel: threading.Event | None = None) -> bytes:
    with stream(url, policy, cancel=cancel) as download:
        return b"".join(download.chunks())


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 around 169.254.169.254
        ("8.8.8.8", "public"),
        ("2606:4700:4700::1111", "public"),
    ],
)
def test_address_kinds(address: str, kind: str):
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_internal_hosts_are_refused_directly_and_through_redirects_and_ftp_is_never_reached():
    with canary() as internal, canary() as ftp, hostile_server() as (base, _):
        for url in (
            f"http://{INTERNAL_HOST}:{internal.port}/secret",
            f"http://localhost:{internal.port}/secret",
            f"{base}/redirect?to=http://{INTERNAL_HOST}:{internal.port}/secret",
        ):
            with pytest.raises(DownloadError, match=r"refused, not a public address \(loopback\)") as refused:
                fetch(url)
            assert str(internal.port) not in str(refused.value)  # nothing about the internal service
        with pytest.raises(DownloadError, match="redirect to a non-http"):
            fetch(f"{base}/redirect?to=ftp://{INTERNAL_HOST}:{ftp.port}/x")
        time.sleep(0.3)
        assert internal.hits == 0 and ftp.hits == 0


def test_https_only_by_default_and_never_down_to_http():
    with pytest.raises(DownloadError, match=r"only https:// URLs are fetched \(PUNKS_DOWNLOAD_ALLOW_HTTP is off\)"):
        fetch("http://example.com/x.safetensors", DownloadPolicy())
    for url in ("ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/"):
        with pytest.raises(DownloadError, match="only https:// URLs are fetched"):
            fetch(url, DownloadPolicy())
    policy = DownloadPolicy()
    with pytest.raises(DownloadError, match="redirect from https to http refused"):
        policy.check_url("http://example.com/x", previous="https://example.com/y")


BROKEN_URLS = [
    f"http://{ALLOWED_HOST}:99999/x",  # port out of range
    "http://[::1/x",  # IPv6 address never closed
    f"http://{ALLOWED_HOST}/x\x00",  # a control character
    "http://" + "a" * 64 + ".example/x",  # a DNS label over 63 characters (IDNA refuses it)
    "http://xn--/x",  # an empty punycode label
]


@pytest.mark.parametrize("url", BROKEN_URLS, ids=range(len(BROKEN_URLS)))
def test_a_url_the_client_cannot_request_is_refused_as_such_first_or_on_a_redirect(url: str):
    with pytest.raises(DownloadError, match=r"not a valid URL \(its host, port or characters\)$"):
        fetch(url)
    with hostile_server() as (base, _), pytest.raises(DownloadError, match=f"^{ALLOWED_HOST}: "):
        fetch(f"{base}/redirect?to={urllib.parse.quote(url, safe=':/')}")  # the client's own refusal, or ours


def test_a_slow_sender_is_cut_by_the_stall_timeout_and_a_dribbling_one_by_the_rate_floor():
    with hostile_server(slow_every_s=20) as (base, _):
        started = time.monotonic()
        with pytest.raises(DownloadError, match="sent nothing for 1 s"):
            fetch(f"{base}/slow", DownloadPolicy(**TEST_POLICY.__dict__ | {"stall_timeout_s": 1.0}))
        assert time.monotonic() - started < 5
    with hostile_server(slow_every_s=0.3) as (base, _):
        started = time.monotonic()
        with pytest.raises(DownloadError, match="slower than"):
            fetch(f"{base}/slow", DownloadPolicy(**TEST_POLICY.__dict__ | {"stall_timeout_s": 1.0}))
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("path", ["/huge", "/huge-chunked"])
def test_an_800_mb_body_is_cut_at_the_cap(path: str):
    cap = 4 * 1024 * 1024
    with hostile_server() as (base, stats):
        with pytest.raises(DownloadError, match="cap"):
            fetch(f"{base}{path}", DownloadPolicy(**TEST_POLICY.__dict__ | {"max_bytes": cap}))
        time.sleep(0.5)
    assert sum(stats.sent) < 64 * 1024 * 1024  # stopped near the cap (socket buffers aside), not 800 MB


def test_a_cancelled_download_stops_within_the_stall_timeout():
    cancel = threading.Event()
    with hostile_server(slow_every_s=0.2) as (base, _):
        threading.Timer(0.5, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(DownloadCancelled):
            fetch(f"{base}/slow", DownloadPolicy(**TEST_POLICY.__dict__ | {"min_bytes_per_s": 0}), cancel)
        assert time.monotonic() - started < 3
