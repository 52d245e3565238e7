"""Safe by default, through the real servers on loopback: a blank token refused at start, bounded request headers,
each API's own error shape for failures outside its handlers, the default LoRA's advertised name accepted,
security headers and a CSP on every page, the API docs served from the app's own assets, trusted hosts, no Host
header echoed into a redirect, HEAD on the health routes."""

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from service.config import Settings
from tests.live_server import ROOT, make_app, served_process, thread_server
from tests.test_http_playground import CHROMIUM, CHROMIUM_ARGS

PAGES = ["/", "/playground/app.js", "/playground/style.css", "/docs", "/redoc", "/openapi.json", "/healthz"]


@pytest.fixture(scope="module")
def local(fast_engine, smoke_settings: Settings) -> Iterator[str]:
    """A tokenless server on loopback: requests arriving there must name a loopback host."""
    with thread_server(make_app(smoke_settings, lambda: fast_engine)) as url:
        yield url


@pytest.mark.parametrize("token", ["", "   "])
def test_a_blank_token_is_refused_at_start_saying_how_to_turn_auth_off(smoke_env: dict[str, str], token: str):
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "0"],
        cwd=ROOT,
        env=smoke_env | {"PUNKS_API_TOKEN": token, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode != 0 and time.monotonic() - started < 120
    assert "PUNKS_API_TOKEN is set but empty" in process.stderr and "unset the variable" in process.stderr


def _send_huge_headers(url: str, total: int) -> bytes:
    """A request whose headers go on for `total` bytes; what the server answered (b"" if it only closed)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
        try:
            for _ in range(total // len(line)):
                sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading and closed
        try:
            return sock.recv(200)
        except ConnectionResetError:
            return b""


def test_oversized_headers_get_431_fast_with_bounded_memory(smoke_env: dict[str, str]):
    with served_process(smoke_env) as (url, process):
        server = psutil.Process(process.pid)
        before = server.memory_info().rss
        started = time.monotonic()
        answers = [_send_huge_headers(url, 100 * 1024 * 1024) for _ in range(4)]
        assert time.monotonic() - started < 30
        assert all(answer.startswith(b"HTTP/1.1 431") or answer == b"" for answer in answers), answers
        assert any(answer.startswith(b"HTTP/1.1 431") for answer in answers), answers
        assert server.memory_info().rss - before < 50 * 1024 * 1024
        assert httpx.get(f"{url}/healthz", headers={"X-Normal": "a" * 4000}).status_code == 200


def test_body_limit_answers_in_each_apis_own_shape(local: str):
    big = {"prompt": "a" * 20_000}
    openai = httpx.post(f"{local}/v1/images/generations", json=big)
    assert openai.status_code == 413 and set(openai.json()["error"]) == {"message", "type", "param", "code"}
    a1111 = httpx.post(f"{local}/sdapi/v1/txt2img", json=big)
    assert a1111.status_code == 413 and a1111.json()["error"] == "HTTPException" and "errors" in a1111.json()
    # the routes that take an image have their own, larger limit (PUNKS_MAX_IMAGE_BODY_BYTES)
    native = httpx.post(f"{local}/v1/generate", json={"prompt": "a" * (Settings().max_image_body_bytes + 1)})
    assert native.status_code == 413 and native.json()["detail"][0]["type"] == "too_large"
    variations = httpx.post(
        f"{local}/v1/images/variations", files={"image": ("x.png", bytes(Settings().max_image_body_bytes + 1))}
    )
    assert variations.status_code == 413 and set(variations.json()["error"]) == {"message", "type", "param", "code"}


def test_starlettes_http_exceptions_take_each_apis_shape(local: str):
    """A body that cannot be parsed at all is Starlette's HTTPException (400), not FastAPI's subclass."""
    headers = {"Content-Type": "application/json"}
    for path, key in (("/v1/images/generations", "error"), ("/sdapi/v1/txt2img", "detail")):
        response = httpx.post(f"{local}{path}", content=b'{"prompt": "x"', headers=headers)
        assert response.status_code in (400, 422) and key in response.json(), response.text
    openai = httpx.post(f"{local}/v1/images/generations", content=b"\xff\xfe", headers=headers)
    assert openai.status_code == 400 and "error" in openai.json()


def test_unknown_paths_and_wrong_methods_take_each_apis_shape(local: str):
    """404 and 405 come from the router, before any route: still each API's own shape (the openai client reads
    `error.message`), with the Allow header of a 405."""
    for method, path, status in [
        ("GET", "/v1/images/generations", 405),
        ("PUT", "/v1/images/variations", 405),
        ("POST", "/v1/images/edits", 404),
    ]:
        response = httpx.request(method, f"{local}{path}")
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{local}/v1/images/generations").headers["allow"] == "POST"
    for method, path, status in [("GET", "/sdapi/v1/txt2img", 405), ("POST", "/sdapi/v1/extra-single-image", 404)]:
        response = httpx.request(method, f"{local}{path}")
        assert response.status_code == status and response.json()["errors"].startswith(f"{status}: ")
    native = httpx.get(f"{local}/v1/generate")  # FastAPI's shape, as every other failure of the native API
    assert native.status_code == 405 and native.json() == {"detail": "Method Not Allowed"}


def test_the_advertised_default_lora_is_accepted_everywhere(local: str):
    default = httpx.get(f"{local}/v1/loras").json()["default"]
    body = {"prompt": "a punk", "seed": 3, "lora": default}
    named = httpx.post(f"{local}/v1/generate", json=body, timeout=120)
    unnamed = httpx.post(f"{local}/v1/generate", json={"prompt": "a punk", "seed": 3}, timeout=120)
    assert named.status_code == 200, named.text
    assert named.json()["images"][0]["image"] == unnamed.json()["images"][0]["image"]


def test_security_headers_and_csp_on_every_page(local: str):
    for path in PAGES:
        response = httpx.get(f"{local}{path}")
        assert response.status_code == 200, path
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer", path
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "http" not in csp and "*" not in csp, path  # nothing but the app's own origin


def test_docs_load_nothing_from_outside(local: str):
    for path in ("/docs", "/redoc"):
        page = httpx.get(f"{local}{path}").text
        assert "http://" not in page and "https://" not in page and "<script>" not in page.replace(" ", "")
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "swagger-init.js"):
        assert httpx.get(f"{local}/docs/assets/{asset}").status_code == 200
    assert httpx.get(f"{local}/docs/assets/..%2Fapp.py").status_code == 404


def test_docs_render_under_their_csp_in_chromium(local: str):
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing (see tests/test_http_playground.py)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            violations: list[str] = []
            page.on(
                "console",
                lambda message: violations.append(message.text) if "Content Security" in message.text else None,
            )
            page.goto(f"{local}/docs")
            page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
            assert "Bespoke Punks" in page.inner_text(".swagger-ui .info .title")
            page.goto(f"{local}/")
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            assert violations == []
        finally:
            browser.close()


def test_unknown_hosts_are_refused_on_a_tokenless_loopback_server(local: str):
    port = local.rsplit(":", 1)[1]
    assert httpx.get(f"{local}/healthz", headers={"Host": "attacker.example"}).status_code == 400
    assert httpx.get(f"{local}/v1/loras", headers={"Host": f"rebound.attacker.example:{port}"}).status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{local}/healthz", headers={"Host": host}).status_code == 200, host


def test_trusted_hosts_setting_and_any_host_with_a_token(fast_engine, smoke_settings: Settings):
    app = make_app(smoke_settings, lambda: fast_engine, trusted_hosts=("punks.example.com",))
    with thread_server(app, ready=False) as url:
        assert httpx.get(f"{url}/healthz", headers={"Host": "punks.example.com"}).status_code == 200
        assert httpx.get(f"{url}/healthz", headers={"Host": "other.example.com"}).status_code == 400
    with thread_server(make_app(smoke_settings, lambda: fast_engine, api_token="s3cret"), ready=False) as url:
        assert httpx.get(f"{url}/healthz", headers={"Host": "punks.example.com"}).status_code == 200


def test_no_redirect_echoes_the_host_and_head_answers_health(local: str):
    response = httpx.get(f"{local}/v1/loras/", headers={"Host": "127.0.0.1"})
    assert response.status_code == 404 and "location" not in response.headers
    assert httpx.head(f"{local}/healthz").status_code == 200
    assert httpx.head(f"{local}/readyz").status_code == 200
