"""Issue 13, through real uvicorn servers on 127.0.0.1: bodies that used to give a 500, slow bodies, clients
that hang up, health that tells the truth, bounded shutdown, metrics of the docs routes, the OpenAPI auth.

`served` is `python -m service serve` (the Dockerfile's CMD) as a subprocess with small limits and its log in
a file; the others run the app in a thread around the session's smoke engine (tests/live_server.py).
"""

import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.engine import Engine, Rendered
from tests.live_server import (
    ROOT,
    SpyEngine,
    ThreadServer,
    make_app,
    metric_samples,
    post,
    served_process,
    thread_server,
    wait_queued,
    wait_ready,
)

BODY_TIMEOUT_S = 1.0
LIMIT_CONCURRENCY = 6


@pytest.fixture(scope="module")
def served(smoke_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("served") / "server.log"
    env = smoke_env | {
        "PUNKS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "PUNKS_LIMIT_CONCURRENCY": str(LIMIT_CONCURRENCY),
        "PUNKS_GENERATION_SIZE": "256",
        "PUNKS_STEPS": "1",
    }
    with served_process(env, log) as (url, _):
        yield url, log


def raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    """A connection to the server that has sent `head` (the request line and headers) and `body`."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# --- 1. no 500 on any body -------------------------------------------------------------------------

NON_JSON_VALUES = [
    (b'{"prompt": "lad", "guidance_scale": NaN}', "guidance_scale"),
    (b'{"prompt": "lad", "guidance_scale": Infinity}', "guidance_scale"),
    (b'{"prompt": "lad", "guidance_scale": -Infinity}', "guidance_scale"),
    (b'{"prompt": "lad", "guidance_scale": 1e999}', "guidance_scale"),
    (b'{"prompt": "lad", "seed": 1e400}', "seed"),
    (b'{"prompt": "lad", "seed": NaN}', "seed"),
    (b'{"prompt": "lad", "num_inference_steps": Infinity}', "num_inference_steps"),
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": "lad \\udfff here"}', "prompt"),
    (b'{"prompt": "lad", "foo": NaN}', "foo"),
    (b'{"prompt": "lad", "foo": "\\ud800"}', "foo"),
    (b'{"prompt": "lad", "\\ud800": 1}', None),  # pydantic cannot read the key: the body is named
    (b'{"prompt": "lad", "lora": "\\ud800"}', "lora"),
    (b'{"prompt": "lad", "output_format": "\\ud800"}', "output_format"),
    (b'{"prompt": NaN}', "prompt"),
]


@pytest.mark.parametrize(("content", "field"), NON_JSON_VALUES, ids=[c.decode()[:50] for c, _ in NON_JSON_VALUES])
def test_non_json_values_are_422_naming_the_field(served: tuple[str, Path], content: bytes, field: str | None):
    url, _ = served
    response = httpx.post(f"{url}/v1/generate", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert not re.search(r"\bNaN\b|Infinity", response.text)  # response.json() would have accepted them
    loc = ["body", field] if field else ["body"]
    assert loc in [error["loc"][: len(loc)] for error in detail]
    assert all(set(error) == {"type", "loc", "msg"} for error in detail)  # no echoed input


@pytest.mark.parametrize(
    "content", [b"\xff\xfe{}", b'{"prompt": "\xc3"}', b"[" * 5000 + b"]" * 5000], ids=["bom", "bad-utf8", "deep"]
)
def test_unparseable_bodies_are_4xx(served: tuple[str, Path], content: bytes):
    url, _ = served
    response = httpx.post(f"{url}/v1/generate", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert response.json()["detail"]


def test_the_log_holds_no_traceback(served: tuple[str, Path]):
    url, log = served
    for content, _ in NON_JSON_VALUES:  # again, whatever ran before
        httpx.post(f"{url}/v1/generate", content=content, headers={"Content-Type": "application/json"})
    assert httpx.get(f"{url}/healthz").status_code == 200
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


# --- 2. slow bodies are cut off, connections are bounded ------------------------------------------


def test_an_incomplete_body_is_answered_408_and_closed_while_others_are_served(served: tuple[str, Path]):
    url, _ = served
    head = "POST /v1/generate HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\nContent-Length: 200\n"
    sock = raw_request(url, head, b'{"prompt": "lad", "s')  # 20 of 200 bytes, then nothing
    started = time.monotonic()
    assert post(url, {"prompt": "served meanwhile", "seed": 3}).status_code == 200
    answer = read_until_closed(sock)  # returns once the server closed the connection
    assert time.monotonic() - started < BODY_TIMEOUT_S + 20
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    sock.close()
    route = (("method", "POST"), ("route", "/v1/generate"), ("status", "408"))
    assert metric_samples(url)[("punks_http_requests_total", route)] >= 1


def test_connections_beyond_the_limit_get_503_at_once_and_the_slow_ones_are_cut_off(served: tuple[str, Path]):
    url, _ = served
    head = "POST /v1/generate HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\nContent-Length: 200\n"
    slow = [raw_request(url, head, b"{") for _ in range(LIMIT_CONCURRENCY + 2)]
    answers = [read_until_closed(sock)[:12] for sock in slow]  # each connection is answered and closed
    for sock in slow:
        sock.close()
    assert set(answers) <= {b"HTTP/1.1 503", b"HTTP/1.1 408"}, answers  # none is held open
    assert answers.count(b"HTTP/1.1 503") >= 2, answers  # beyond the limit: refused at once
    assert httpx.get(f"{url}/healthz").status_code == 200


# --- 3. work for clients that have gone is not done -----------------------------------------------


def test_a_client_that_hangs_up_while_queued_is_never_rendered(fast_engine: Engine, smoke_settings: Settings):
    spy = SpyEngine(fast_engine)
    spy.gate.clear()
    with thread_server(make_app(smoke_settings, lambda: spy)) as url, ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(post, url, {"prompt": "blocker"})
        assert spy.entered.wait(30)
        body = b'{"prompt": "gone away", "num_outputs": 4}'
        head = (
            "POST /v1/generate HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
            f"Content-Length: {len(body)}\n"
        )
        gone = [raw_request(url, head, body) for _ in range(3)]
        wait_queued(url, 3)
        for sock in gone:
            sock.close()
        wait_queued(url, 0)  # they left the queue although the GPU is still busy
        spy.gate.set()
        assert blocker.result().status_code == 200
        assert post(url, {"prompt": "after"}).status_code == 200
        samples = metric_samples(url)
    assert spy.calls == [["blocker"], ["after"]]
    assert samples[("punks_unrendered_requests_total", (("reason", "client_gone"),))] == 3
    assert samples[("punks_client_disconnects_total", ())] == 3
    route = (("method", "POST"), ("route", "/v1/generate"))
    assert samples[("punks_http_requests_total", route + (("status", "499"),))] == 3
    assert samples[("punks_http_requests_total", route + (("status", "200"),))] == 2


# --- 4. health tells the truth; no server paths for anonymous callers --------------------------------


class Fatal(BaseException):
    """Not an Exception: it kills the batcher's task, as a bug in the batcher would."""


class DyingEngine(SpyEngine):
    def render(self, requests, progress=None) -> list[Rendered]:
        if any(request.prompt == "kill" for request in requests):
            raise Fatal
        return super().render(requests, progress)


def test_a_dead_batcher_fails_readiness_and_liveness(fast_engine: Engine, smoke_settings: Settings):
    dying = DyingEngine(fast_engine)
    with thread_server(make_app(smoke_settings, lambda: dying, request_timeout_s=60)) as url:
        assert post(url, {"prompt": "fine"}).status_code == 200
        killed = post(url, {"prompt": "kill"})
        assert killed.status_code == 503, killed.text  # at once, not a 504 after request_timeout_s
        assert httpx.get(f"{url}/readyz").status_code == 503
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 503 and "worker stopped" in health.json()["detail"]
        assert post(url, {"prompt": "after"}).status_code == 503


def test_a_failed_load_fails_readiness_and_liveness_without_showing_paths(smoke_settings: Settings):
    def broken() -> Engine:
        raise FileNotFoundError("/srv/secret/weights/v1-5-pruned-emaonly.safetensors not found")

    with thread_server(make_app(smoke_settings, broken), ready=False) as url:
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/healthz")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = httpx.get(f"{url}/readyz")
        assert health.status_code == 503 and ready.status_code == 503
        assert ready.json()["error"] == "FileNotFoundError"
        assert "/srv" not in ready.text + health.text


def test_unknown_lora_message_names_no_server_path(served: tuple[str, Path], smoke_env: dict[str, str]):
    url, _ = served
    response = post(url, {"prompt": "lad", "lora": "no-such-lora"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "lora"]
    assert smoke_env["PUNKS_WEIGHTS_DIR"] not in response.text and "/" not in response.json()["detail"][0]["msg"]


def test_docker_checks_readiness_and_starts_with_the_serve_command():
    dockerfile = (ROOT / "Dockerfile").read_text()
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :].split("\nCMD")[0]
    assert "/readyz" in healthcheck and "/healthz" not in healthcheck
    assert re.search(r'^CMD \["python", "-m", "service", "serve"', dockerfile, re.M)


# --- 5. shutdown is bounded ------------------------------------------------------------------------


def received(samples: dict) -> float:
    """Generation requests that reached the batcher: queued, or rendered in a batch (one image each here)."""
    return samples[("punks_queue_depth", ())] + samples[("punks_batch_images_count", ())]


def test_sigterm_with_a_full_queue_refuses_the_rest_and_exits_within_the_bound(smoke_env: dict[str, str]):
    shutdown_s, queued = 2.0, 12
    env = smoke_env | {
        "PUNKS_SHUTDOWN_TIMEOUT_S": str(shutdown_s),
        "PUNKS_MAX_BATCH_SIZE": "1",
        "PUNKS_MAX_QUEUE": str(queued),
        "PUNKS_GENERATION_SIZE": "256",
    }
    with served_process(env) as (url, process), ThreadPoolExecutor(queued + 1) as pool:
        body = {"prompt": "slow", "num_inference_steps": 12}  # the queue takes far longer than the bound
        futures = [pool.submit(post, url, body) for _ in range(queued + 1)]
        deadline = time.monotonic() + 60
        while received(metric_samples(url)) < queued + 1:  # all inside: none still in the listen backlog (a reset)
            assert time.monotonic() < deadline, "the queue never filled"
            time.sleep(0.05)
        signalled = time.monotonic()
        process.terminate()  # SIGTERM
        process.wait(timeout=120)
        exit_s = time.monotonic() - signalled
        statuses = [future.result().status_code for future in futures]
    # the bound, plus the one batch on the GPU (it cannot be interrupted) and the interpreter's exit
    assert process.returncode in (0, -signal.SIGTERM) and exit_s < shutdown_s + 20, exit_s  # uvicorn re-raises it
    assert set(statuses) <= {200, 429, 503} and statuses.count(503) >= queued // 2, statuses


def test_shutdown_answers_queued_requests_503_at_the_deadline(fast_engine: Engine, smoke_settings: Settings):
    spy = SpyEngine(fast_engine)
    spy.gate.clear()  # the GPU never gets to the queue
    server = ThreadServer(make_app(smoke_settings, lambda: spy, shutdown_timeout_s=0.5)).start()
    wait_ready(server.url)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, server.url, {"prompt": "running"})
        assert spy.entered.wait(30)
        queued = [pool.submit(post, server.url, {"prompt": f"queued {i}"}) for i in range(2)]
        wait_queued(server.url, 2)
        server.server.should_exit = True  # what SIGTERM does
        answers = [future.result(timeout=30) for future in [running, *queued]]
    assert [answer.status_code for answer in answers] == [503] * 3
    assert all("shutting down" in answer.json()["detail"] for answer in answers)
    spy.gate.set()
    server.stop()
    assert spy.calls == [["running"]]


# --- 8. metrics of the docs routes, OpenAPI auth ---------------------------------------------------


def test_docs_routes_are_counted_by_name(served: tuple[str, Path]):
    url, _ = served
    assert httpx.get(f"{url}/docs").status_code == 200 and httpx.get(f"{url}/openapi.json").status_code == 200
    routes = {labels for name, labels in metric_samples(url) if name == "punks_http_requests_total"}
    named = {dict(labels)["route"] for labels in routes if dict(labels)["status"] == "200"}
    assert {"/docs", "/openapi.json"} <= named


def test_openapi_marks_the_token_required_only_when_one_is_configured(smoke_settings: Settings):
    def security(app) -> list:
        schema = app.openapi()
        return [
            schema["paths"]["/v1/generate"]["post"].get("security"),
            schema.get("components", {}).get("securitySchemes"),
        ]

    assert security(make_app(smoke_settings, lambda: None)) == [None, None]
    with_token = security(make_app(smoke_settings, lambda: None, api_token="s3cret"))
    assert with_token[0] == [{"HTTPBearer": []}] and with_token[1]["HTTPBearer"]["scheme"] == "bearer"
