"""The HTTP API end to end: real uvicorn servers on loopback, the smoke model, httpx as the client.

`deployed` is `python -m uvicorn service.http.app:app` as a subprocess with the default settings; the
others run in a thread with an injected engine (a SpyEngine around the session's smoke engine,
generating 256 px in 1 step) so tests can count, hold and fail engine calls.
"""

import base64
import io
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.checks import not_a_server_error

from service import config
from service.config import MAX_SEED, Settings
from service.engine import Engine
from service.http.app import create_app
from tests.live_server import (
    SpyEngine,
    ThreadServer,
    behind_blocker,
    make_app,
    metric_samples,
    post,
    served_process,
    still_running,
    subprocess_server,
    thread_server,
    wait_queued,
    wait_ready,
)


@pytest.fixture(scope="module")
def deployed(smoke_env: dict[str, str]) -> Iterator[str]:
    with subprocess_server(smoke_env) as url:
        yield url


@pytest.fixture
def fresh(spy: SpyEngine) -> Iterator[SpyEngine]:
    spy.calls.clear()
    yield spy
    spy.gate.set()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def cells_are_flat(image: Image.Image, grid: int = 24) -> np.ndarray:
    """The grid x grid colours of an upscaled sprite, asserting every cell is one flat colour."""
    pixels = np.asarray(image.convert("RGB"))
    edges = [round(i * pixels.shape[0] / grid) for i in range(grid + 1)]
    colours = np.zeros((grid, grid, 3), np.uint8)
    for row in range(grid):
        for col in range(grid):
            cell = pixels[edges[row] + 1 : edges[row + 1] - 1, edges[col] + 1 : edges[col + 1] - 1]
            assert (cell == cell[0, 0]).all(), f"cell {row},{col} is not flat"
            colours[row, col] = cell[0, 0]
    return colours


# --- the two response shapes, on the deployed server --------------------------------------------


def test_png_path_returns_flat_1024_image_with_signals_in_headers(deployed: str):
    response = post(deployed, {"prompt": "lad with a red beanie, green background", "seed": 7}, Accept="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (1024, 1024)
    cells_are_flat(image)
    assert response.headers["x-seed"] == "7"
    assert 0.0 <= float(response.headers["x-grid-fit"]) <= 1.0
    assert 1 <= int(response.headers["x-palette-size"]) <= 24 * 24
    assert response.headers["x-is-pixel-art"] in ("true", "false")
    assert response.headers["x-prompt-truncated"] == "false"
    assert "pipeline;dur=" in response.headers["server-timing"]


def test_json_path_images_sprites_seeds_and_truncation(deployed: str):
    prompt = " ".join(["x"] * 250)  # 250 tokens: more than CLIP's 3 chunks leave for the user
    body = {"prompt": prompt, "seed": 11, "num_outputs": 2, "return_sprites": True}
    response = post(deployed, body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["media_type"] == "image/png"
    assert result["truncated"] is True and result["dropped_words"].startswith("x")
    assert result["prompt"].startswith("pixel art, 24x24") and len(result["prompt"]) < len(prompt) + 200
    assert [image["seed"] for image in result["images"]] == [11, 12]
    for image in result["images"]:
        upscaled, sprite = decode(image["image"]), decode(image["sprite"])
        assert upscaled.size == (1024, 1024) and sprite.size == (24, 24)
        assert (cells_are_flat(upscaled) == np.asarray(sprite.convert("RGB"))).all()
        assert image["palette"] and all(len(colour) == 7 and colour[0] == "#" for colour in image["palette"])
        assert set(image["quality"]) == {"grid_fit", "palette_size", "is_pixel_art", "edge_alignment"}
    timings = result["timings"]
    assert min(timings.values()) >= 0 and timings["total_s"] >= timings["pipeline_s"]

    # image 2 of the first request is seed 12's image: made first in another batch of 2 (tests/test_http_determinism.py)
    again = post(deployed, {"prompt": prompt, "seed": 12, "num_outputs": 2})
    assert again.json()["images"][0]["image"] == result["images"][1]["image"]


def test_snap_processes_serve_the_same_images_and_stop_with_the_server(deployed: str, smoke_env: dict[str, str]):
    """PUNKS_SNAP_PROCESSES=2 on `python -m service serve`: a request gets the image the default server (snapping
    on threads) gives, concurrent ones are all answered, and SIGTERM leaves no snap process behind."""
    body = {"prompt": "punk with a cap", "seed": 3, "return_sprites": True}
    with served_process(smoke_env | {"PUNKS_SNAP_PROCESSES": "2"}) as (url, process):
        children = psutil.Process(process.pid).children()  # the two snap processes, multiprocessing's resource tracker
        assert len(children) >= 2
        alone = post(url, body)
        with ThreadPoolExecutor(3) as pool:  # batched together: their raw images round a little differently
            together = list(pool.map(lambda seed: post(url, body | {"seed": seed}), [4, 5, 6]))
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
    assert alone.status_code == 200, alone.text
    assert alone.json()["images"] == post(deployed, body).json()["images"]
    for response in together:
        assert response.status_code == 200, response.text
        (image,) = response.json()["images"]
        assert (cells_are_flat(decode(image["image"])) == np.asarray(decode(image["sprite"]).convert("RGB"))).all()
    assert not [child for child in children if still_running(child)]


# --- validation: every field's bad values are a 4xx naming the field, never a 500 ------------------

BAD_BODIES = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n\t"}, "prompt"),
    ({"prompt": "\u200b\u2060\u200b"}, "prompt"),  # only zero-width characters: nothing visible
    ({"prompt": "\U0001f600" * 500}, "prompt"),  # nothing of it fits CLIP's budget
    ({"prompt": "lad", "output_size": 23}, "output_size"),
    ({"prompt": "lad", "integer_scale": "yes"}, "integer_scale"),
    ({"prompt": "x" * (config.MAX_PROMPT_CHARS + 1)}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ["lad"]}, "prompt"),
    ({"prompt": "lad", "seed": -1}, "seed"),
    ({"prompt": "lad", "seed": MAX_SEED + 1}, "seed"),
    ({"prompt": "lad", "seed": "7"}, "seed"),
    ({"prompt": "lad", "seed": 1.5}, "seed"),
    ({"prompt": "lad", "seed": True}, "seed"),
    ({"prompt": "lad", "num_outputs": 0}, "num_outputs"),
    ({"prompt": "lad", "num_outputs": config.MAX_IMAGES + 1}, "num_outputs"),
    ({"prompt": "lad", "num_outputs": "2"}, "num_outputs"),
    ({"prompt": "lad", "num_inference_steps": config.MIN_STEPS - 1}, "num_inference_steps"),
    ({"prompt": "lad", "num_inference_steps": config.MAX_STEPS + 1}, "num_inference_steps"),
    ({"prompt": "lad", "num_inference_steps": 2.5}, "num_inference_steps"),
    ({"prompt": "lad", "guidance_scale": config.MIN_GUIDANCE - 0.1}, "guidance_scale"),
    ({"prompt": "lad", "guidance_scale": config.MAX_GUIDANCE + 0.1}, "guidance_scale"),
    ({"prompt": "lad", "guidance_scale": "7.5"}, "guidance_scale"),
    ({"prompt": "lad", "output_format": "gif"}, "output_format"),
    ({"prompt": "lad", "output_format": 1}, "output_format"),
    ({"prompt": "lad", "return_sprites": "yes"}, "return_sprites"),
    ({"prompt": "lad", "return_sprites": 1}, "return_sprites"),
    ({"prompt": "lad", "lora_scale": 0.8}, "lora_scale"),  # this server fuses its LoRA once, at 1.0
    ({"prompt": "lad", "lora_scale": 2.5}, "lora_scale"),
    ({"prompt": "lad", "lora": "no-such-lora"}, "lora"),  # checked against the engine's allow-list
    ({"prompt": "lad", "lora": "../bespoke_punks"}, "lora"),
    ({"prompt": "lad", "lora": 3}, "lora"),
    ({"prompt": "lad", "upscaler": "bicubic"}, "upscaler"),
    ({"prompt": "lad", "upscaler": "realesrgan"}, "upscaler"),  # not enabled on this server
    ({"prompt": "lad", "negative_prompt": "x" * (config.MAX_PROMPT_CHARS + 1)}, "negative_prompt"),
    ({"prompt": "lad", "negative_prompt": 3}, "negative_prompt"),
    ({"prompt": "lad", "steps": 2}, "steps"),  # renamed num_inference_steps: no alias
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES, ids=[f"{field}:{body}"[:60] for body, field in BAD_BODIES])
def test_bad_field_is_422_naming_it(deployed: str, body: dict, field: str):
    response = post(deployed, body)
    assert response.status_code == 422, response.text
    assert ["body", field] in [error["loc"][:2] for error in response.json()["detail"]]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "loc"),
    [
        (b'{"prompt": "lad",', "application/json", 422, ["body", 17]),  # cut short
        (b"prompt=lad", "application/json", 422, ["body", 0]),
        (b'{"prompt": "lad"}', "text/plain", 422, ["body"]),
        (b'["lad"]', "application/json", 422, ["body"]),
        (b"", "application/json", 422, ["body"]),
    ],
    ids=["truncated-json", "not-json", "not-json-content-type", "not-an-object", "empty"],
)
def test_bad_body_is_422(deployed: str, content: bytes, content_type: str, status: int, loc: list):
    response = httpx.post(f"{deployed}/v1/generate", content=content, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert loc in [error["loc"] for error in response.json()["detail"]]


def test_huge_body_is_413_by_length_and_by_content(deployed: str):
    """/v1/generate takes an image: its limit is PUNKS_MAX_IMAGE_BODY_BYTES (other routes: PUNKS_MAX_BODY_BYTES)."""
    huge = b'{"prompt": "' + b"x" * (Settings().max_image_body_bytes) + b'"}'
    declared = httpx.post(f"{deployed}/v1/generate", content=huge, headers={"Content-Type": "application/json"})

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to go by
        yield from (huge[i : i + 65536] for i in range(0, len(huge), 65536))

    streamed = httpx.post(f"{deployed}/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["detail"][0]["loc"] == ["body"]


def test_lora_names_are_listed(deployed: str):
    response = httpx.get(f"{deployed}/v1/loras", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"default": "bespoke_punks", "loras": []}


def test_health_and_docs(deployed: str):
    assert httpx.get(f"{deployed}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{deployed}/readyz").json() == {"status": "ready", "smoke_model": True}
    schema = httpx.get(f"{deployed}/openapi.json").json()
    assert {"/v1/generate", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"num_inference_steps", "guidance_scale", "negative_prompt", "lora_scale"} <= set(fields)
    assert not {"steps", "guidance"} & set(fields)
    assert httpx.get(f"{deployed}/docs").status_code == 200


# --- batching, failures and metrics, on an in-process server -------------------------------------


def test_concurrent_requests_share_pipeline_calls(live: str, fresh: SpyEngine):
    bodies = [{"prompt": f"punk number {i}", "seed": i} for i in range(16)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(live, body), bodies))
    assert [response.status_code for response in responses] == [200] * 16
    assert [response.json()["images"][0]["seed"] for response in responses] == list(range(16))
    assert sum(len(call) for call in fresh.calls) == 16
    assert len(fresh.calls) < 16 and max(len(call) for call in fresh.calls) > 1


def test_failing_batch_fails_only_the_faulty_request(live: str, fresh: SpyEngine):
    failures_before = metric_samples(live)[("punks_generation_failures_total", ())]
    boom, fine = behind_blocker(live, fresh, [{"prompt": "boom"}, {"prompt": "fine"}])
    assert boom.status_code == 503
    assert "OutOfMemoryError" in boom.json()["detail"] and "retry-after" in boom.headers
    assert fine.status_code == 200
    assert post(live, {"prompt": "after the storm"}).status_code == 200
    assert metric_samples(live)[("punks_generation_failures_total", ())] == failures_before + 2  # batch, then alone


def test_metrics_expose_requests_latency_batches_queue_and_failures(live: str, fresh: SpyEngine):
    assert post(live, {"prompt": "counted", "num_outputs": 2}).status_code == 200
    samples = metric_samples(live)
    route = (("method", "POST"), ("route", "/v1/generate"))
    assert samples[("punks_http_requests_total", route + (("status", "200"),))] >= 1
    assert samples[("punks_http_request_duration_seconds_count", route)] >= 1
    assert samples[("punks_batch_images_count", ())] >= 1 and samples[("punks_batch_images_sum", ())] >= 2
    assert samples[("punks_queue_depth", ())] == 0
    assert ("punks_generation_failures_total", ()) in samples


# --- limits, auth, readiness, shutdown: servers with their own settings ---------------------------


def test_full_queue_is_429(smoke_settings: Settings, fast_engine: Engine):
    spy = SpyEngine(fast_engine)
    spy.gate.clear()
    with thread_server(make_app(smoke_settings, lambda: spy, max_queue=1)) as url, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, url, {"prompt": "running"})
        assert spy.entered.wait(30)
        queued = pool.submit(post, url, {"prompt": "queued"})
        wait_queued(url, 1)
        rejected = post(url, {"prompt": "one too many"})
        assert rejected.status_code == 429 and int(rejected.headers["retry-after"]) > 0
        spy.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_timeout_is_504_and_drops_the_queued_request(smoke_settings: Settings, fast_engine: Engine):
    spy = SpyEngine(fast_engine)
    spy.gate.clear()
    with thread_server(make_app(smoke_settings, lambda: spy, request_timeout_s=1.0)) as url:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, url, {"prompt": "running"})
            assert spy.entered.wait(30)
            queued = pool.submit(post, url, {"prompt": "queued"})
            assert running.result().status_code == 504 and queued.result().status_code == 504
        assert metric_samples(url)[("punks_queue_depth", ())] == 0  # "queued" left the queue
        spy.gate.set()
        while spy.finished < 1:
            time.sleep(0.02)
    assert spy.calls == [["running"]]  # and never ran


def test_bearer_token(smoke_settings: Settings, fast_engine: Engine):
    with thread_server(make_app(smoke_settings, lambda: fast_engine, api_token="s3cret")) as url:
        body = {"prompt": "lad", "seed": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            response = post(url, body, **headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert post(url, body, Authorization="Bearer s3cret").status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200


def test_readyz_is_503_until_the_engine_is_loaded(smoke_settings: Settings, fast_engine: Engine):
    loaded = threading.Event()

    def slow_load() -> Engine:
        assert loaded.wait(60)
        return fast_engine

    with thread_server(make_app(smoke_settings, slow_load), ready=False) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 503
        early = post(url, {"prompt": "too early"})
        assert early.status_code == 503 and "loading" in early.json()["detail"]
        loaded.set()
        wait_ready(url)
        assert post(url, {"prompt": "in time"}).status_code == 200


def test_failed_load_keeps_readyz_503(smoke_settings: Settings):
    def broken() -> Engine:
        raise FileNotFoundError("no weights here")

    with thread_server(make_app(smoke_settings, broken), ready=False) as url:
        deadline = time.monotonic() + 30
        while "failed" not in (ready := httpx.get(f"{url}/readyz")).json()["detail"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["error"] == "FileNotFoundError"  # the message: in the log
        assert post(url, {"prompt": "lad"}).status_code == 503
        assert httpx.get(f"{url}/healthz").status_code == 503  # it never will be ready: restart or fix it


def test_shutdown_finishes_running_and_queued_work(smoke_settings: Settings, fast_engine: Engine):
    spy = SpyEngine(fast_engine)
    spy.gate.clear()
    server = ThreadServer(make_app(smoke_settings, lambda: spy)).start()
    wait_ready(server.url)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, server.url, {"prompt": "running"})
        assert spy.entered.wait(30)
        queued = pool.submit(post, server.url, {"prompt": "queued"})
        wait_queued(server.url, 1)
        server.server.should_exit = True  # what SIGTERM does
        time.sleep(0.2)
        spy.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    server.stop()
    assert spy.calls == [["running"], ["queued"]]


# --- fuzzing: whatever schemathesis sends, the answer is never a 5xx --------------------------------


@pytest.fixture(scope="module")
def fuzz_url(fast_engine: Engine, smoke_settings: Settings) -> Iterator[str]:
    capped = SpyEngine(fast_engine, cap=True)  # valid requests generate 1 image in 1 step, whatever they ask
    with thread_server(make_app(smoke_settings, lambda: capped)) as url:
        yield url


# The schema the server serves, built at import time (creating the app loads nothing); calls go to fuzz_url.
# (schemathesis.pytest.from_fixture would fetch it from the server, but fails under pytest 9: no Node._nodeid.)
fuzzed = schemathesis.openapi.from_dict(create_app().openapi())
fuzzed.config.phases.update(phases=["examples", "coverage", "fuzzing"])


@fuzzed.parametrize()
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case, fuzz_url: str):
    case.call_and_validate(base_url=fuzz_url, checks=[not_a_server_error])
