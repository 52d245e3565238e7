"""The Cog runner as Replicate calls it (the real coglet server on loopback), its schema, its packaging
files, and the optional weights download at setup (service/weights/fetch.py, against a local http.server)."""

import asyncio
import base64
import functools
import hashlib
import http.server
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from devtools.cog_schema import ROOT, SCHEMA_PATH, build_schema, is_current
from service import config
from service.config import MAX_SEED, Settings
from service.errors import WeightsError
from service.samplers import SAMPLER_NAMES
from service.weights.fetch import FetchError, WeightFile, fetch_weights, fetch_weights_from_env, parse_spec, redact
from tests.hostile_hosts import ALLOWED_HOST, ALLOWED_NETWORKS_ENV, INTERNAL_HOST, canary, hostile_server
from tests.live_server import subprocess_server
from train import sprites

GRID = 24
COG_MAX_CONCURRENCY = 8  # predict.py's @cog.concurrent(max=8); test_concurrency_is_declared checks it
SERVER_START_S = 180


# --- helpers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cell_edges(size: int, cell: int | None = None) -> np.ndarray:
    """Where service.pixelart.upscale puts the cell boundaries."""
    if cell is not None:
        return np.arange(GRID + 1) * cell
    return np.floor(np.arange(GRID + 1) * size / GRID + 0.5).astype(int)


def assert_flat_cells(image: Image.Image, edges: np.ndarray) -> np.ndarray:
    """Every cell one flat colour; returns the 24x24 sprite those colours make."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape[:2] == (edges[-1], edges[-1])
    sprite = np.zeros((GRID, GRID, 3), dtype=int)
    for row in range(GRID):
        for col in range(GRID):
            cell = pixels[edges[row] : edges[row + 1], edges[col] : edges[col + 1]]
            assert (cell == cell[0, 0]).all(), f"cell ({row}, {col}) is not flat"
            sprite[row, col] = cell[0, 0]
    return sprite


def decode_data_url(url: str) -> tuple[str, bytes]:
    match = re.fullmatch(r"data:([\w/+.-]+);base64,(.*)", url, re.S)
    assert match, f"not a base64 data URL: {url[:60]!r}"
    return match[1], base64.b64decode(match[2])


class CogServer:
    """`python -m cog.server.http` (coglet), as `cog build` images start it, on a loopback port."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        cwd: Path,
        log_dir: Path,
        runner_ref: str = "predict.py:Runner",
        args: tuple[str, ...] = (),
        concurrency: int = COG_MAX_CONCURRENCY,  # 1 for a sync runner (trainer.py's train)
    ):
        self.port = free_port()
        self.log = log_dir / f"cog-{name}.log"
        tmp = log_dir / f"tmp-{name}"
        tmp.mkdir()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *args],
                cwd=cwd,
                env=env
                | {
                    "COG_PREDICT_TYPE_STUB": runner_ref,
                    "PORT": str(self.port),
                    "PYTHONUNBUFFERED": "1",
                    "COG_MAX_CONCURRENCY": str(concurrency),  # what cog build bakes into the image
                    "TMPDIR": str(tmp),  # the runner's output files
                    # coglet starts its worker as `python` from PATH: it must be this venv's python
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: coglet's worker subprocess is stopped with it
            )
        self._health: dict | None = None
        self._failure: str | None = None  # once a server failed to settle, every later test fails at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_until_settled(self) -> dict:
        """Poll /health-check until setup has succeeded or failed; its JSON."""
        if self._health is not None:
            return self._health
        if self._failure is not None:
            pytest.fail(self._failure)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._failure = f"cog server exited with {self.process.returncode}:\n{self.log_tail()}"
                pytest.fail(self._failure)
            try:
                with urllib.request.urlopen(f"{self.url}/health-check", timeout=5) as response:
                    health = json.load(response)
                if health["status"] in ("READY", "SETUP_FAILED"):
                    self._health = health
                    return health
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self._failure = f"cog server not settled after {SERVER_START_S}s:\n{self.log_tail()}"
        pytest.fail(self._failure)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def has_started(self, prediction_id: str, log_offset: int) -> bool:
        """Whether coglet has given the prediction a slot since the log was log_offset bytes long: it logs
        "Starting prediction" once it has (an ID can come again once its prediction is over)."""
        with self.log.open("rb") as log:
            log.seek(log_offset)
            lines = log.read().decode(errors="replace").splitlines()
        return any('"Starting prediction"' in line and f'"prediction_id":"{prediction_id}"' in line for line in lines)

    def predict(self, **inputs) -> tuple[int, dict]:
        """POST /predictions, synchronously. coglet 0.23.1 can answer 409 (at capacity) with slots free when
        another request asks for a slot at the same instant (post_together says why); a client retries."""
        deadline = time.monotonic() + 30
        while True:
            status, body = self.request("POST", "/predictions", {"input": inputs})
            if status != 409 or time.monotonic() > deadline:
                return status, body
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def cog_servers(smoke_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """Three servers, started together (they load in parallel), each test waits for the one it uses:
    ready: the committed schema and the smoke model, as on Replicate but without weights (lora_url on, as cog.yaml),
    snapping in worker processes as on a GPU (where PUNKS_SNAP_PROCESSES defaults to 4; on a CPU to none);
    no_schema: same runner without .cog/openapi_schema.json, so bad input reaches run();
    no_weights: smoke fallback disallowed (as cog.yaml sets it) and no weights: setup fails."""
    logs = tmp_path_factory.mktemp("cog-logs")
    bare = tmp_path_factory.mktemp("no-schema-cwd")
    lora_url_cache = {
        "PUNKS_LORA_URL_CACHE_SIZE": "2",
        "PUNKS_LORA_URL_CACHE_DIR": str(logs / "lora-url-cache"),
        # The download policy as deployed, but for http and the one loopback address standing in for a public
        # host (tests/hostile_hosts.py); everything else on loopback stays refused.
        "PUNKS_DOWNLOAD_ALLOW_HTTP": "true",
        "PUNKS_DOWNLOAD_ALLOWED_NETWORKS": ALLOWED_NETWORKS_ENV,
        "PUNKS_DOWNLOAD_STALL_TIMEOUT_S": "5",
        "PUNKS_DOWNLOAD_MIN_BYTES_PER_S": "0",  # a sender of one byte a second may go on until the deadline
    }
    snap_processes = {"PUNKS_SNAP_PROCESSES": "2"}
    servers = {
        "ready": CogServer("ready", smoke_env | lora_url_cache | snap_processes, ROOT, logs),
        "no_schema": CogServer(
            "no-schema", smoke_env | {"PYTHONPATH": str(ROOT)}, bare, logs, runner_ref=f"{ROOT / 'predict.py'}:Runner"
        ),
        "no_weights": CogServer(
            "no-weights",
            smoke_env
            | {"PUNKS_ALLOW_SMOKE_MODEL": "false", "PUNKS_WEIGHTS_DIR": str(tmp_path_factory.mktemp("empty"))},
            ROOT,
            logs,
        ),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def server(cog_servers) -> CogServer:
    server = cog_servers["ready"]
    health = server.wait_until_settled()
    assert health["status"] == "READY", health["setup"]["logs"]
    return server


# --- the schema and the packaging files -------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict:
    return build_schema()


def test_committed_schema_is_current(schema: dict):
    assert SCHEMA_PATH.is_file(), "missing .cog/openapi_schema.json: run `python -m devtools.cog_schema`"
    committed = json.loads(SCHEMA_PATH.read_text())
    assert is_current(committed, schema), ".cog/openapi_schema.json is stale: run `python -m devtools.cog_schema`"


def test_input_bounds_are_the_shared_ones(schema: dict):
    """predict.py spells its bounds as literals (cog build reads them statically): they must match config."""
    inputs = schema["components"]["schemas"]["Input"]
    props = inputs["properties"]
    fields = Settings.model_fields

    def bounds(name: str) -> tuple:
        return props[name].get("minimum"), props[name].get("maximum")

    def field_bounds(name: str) -> tuple:
        metadata = {type(m).__name__: m for m in fields[name].metadata}
        return metadata["Ge"].ge, metadata["Le"].le

    assert inputs["required"] == ["prompt"]
    assert (props["prompt"]["minLength"], props["prompt"]["maxLength"]) == (1, config.MAX_PROMPT_CHARS)
    assert bounds("seed") == (0, MAX_SEED) and props["seed"]["nullable"] is True
    assert bounds("num_outputs") == (1, config.MAX_IMAGES)
    assert bounds("steps") == (config.MIN_STEPS, config.MAX_STEPS)
    assert bounds("guidance") == (config.MIN_GUIDANCE, config.MAX_GUIDANCE)
    assert bounds("output_size") == field_bounds("output_size")
    for name in ("steps", "guidance", "output_size", "integer_scale"):  # empty: the deployment's PUNKS_* setting
        assert props[name].get("default") is None and props[name]["nullable"] is True, name
        assert f"PUNKS_{name.upper()} ({str(fields[name].default).lower()})" in props[name]["description"], name
    assert schema["components"]["schemas"]["output_format"]["enum"] == ["png", "webp"]
    assert schema["components"]["schemas"]["scheduler"]["enum"] == list(SAMPLER_NAMES)  # service/samplers.py's
    assert props["scheduler"].get("default") is None and props["scheduler"]["nullable"] is True
    assert "lora_scale" not in props  # fused once at setup: PUNKS_LORA_SCALE, not an input
    assert bounds("strength") == (config.MIN_STRENGTH, config.MAX_STRENGTH)
    assert props["strength"]["default"] == config.DEFAULT_STRENGTH and props["image"]["format"] == "uri"
    assert f"up to {config.MAX_PALETTE_COLORS} '#rrggbb'" in props["palette"]["description"]
    assert f"at most {config.MAX_IMAGE_SIDE} px" in props["image"]["description"]
    assert all(prop.get("description") for prop in props.values())
    output = schema["components"]["schemas"]["Output"]
    files = {"type": "array", "items": {"type": "string", "format": "uri"}}
    assert output["type"] == "object" and output["required"] == ["images", "seeds"]
    assert {name: {k: v for k, v in prop.items() if k in files} for name, prop in output["properties"].items()} == {
        "images": files,
        "sprites": files,
        "smooth": files,
        "seeds": {"type": "array", "items": {"type": "integer"}},
    }


# --- through the real cog server -----------------------------------------------------------------------


def test_serves_the_committed_schema(server: CogServer):
    status, served = server.request("GET", "/openapi.json")
    assert status == 200
    assert (
        served["components"]["schemas"]["Input"]
        == json.loads(SCHEMA_PATH.read_text())["components"]["schemas"]["Input"]
    )


def test_prediction_returns_1024_images_of_flat_cells_then_sprites(server: CogServer):
    status, body = server.predict(
        prompt="lad with a red beanie, green background", seed=7, num_outputs=2, steps=2, return_sprites=True
    )
    assert status == 200 and body["status"] == "succeeded", body.get("error") or body
    output = body["output"]
    assert len(output["images"]) == len(output["sprites"]) == 2 and output["seeds"] == [7, 8]
    assert output["smooth"] is None
    decoded = [decode_data_url(url) for url in output["images"] + output["sprites"]]
    assert [mime for mime, _ in decoded] == ["image/png"] * 4
    images = [Image.open(io.BytesIO(data)) for _, data in decoded]
    assert [im.size for im in images] == [(1024, 1024)] * 2 + [(GRID, GRID)] * 2
    for image, sprite in zip(images[:2], images[2:], strict=True):
        cells = assert_flat_cells(image, cell_edges(1024))
        assert (cells == np.asarray(sprite.convert("RGB"))).all(), "the sprite is not the image's cells"
    # one log line per image, with its seed and quality signals; the seeds are metrics too
    lines = [line for line in body["logs"].splitlines() if line.startswith("image ")]
    assert len(lines) == 2
    assert lines[0].startswith("image 1: seed 7: ") and lines[1].startswith("image 2: seed 8: ")
    assert all("grid fit" in line and "colours" in line for line in lines)
    assert body["metrics"]["seeds"] == [7, 8] and len(body["metrics"]["pixel_art"]) == 2
    assert "SMOKE model" in body["logs"]


def test_webp_and_integer_scale(server: CogServer):
    status, body = server.predict(
        prompt="a punk", seed=3, steps=1, output_format="webp", output_size=512, integer_scale=True, return_sprites=True
    )
    assert status == 200 and body["status"] == "succeeded", body.get("error") or body
    (mime, image_data), (sprite_mime, sprite_data) = [
        decode_data_url(body["output"][key][0]) for key in ("images", "sprites")
    ]
    assert mime == sprite_mime == "image/webp"
    image, sprite = Image.open(io.BytesIO(image_data)), Image.open(io.BytesIO(sprite_data))
    assert image.format == "WEBP" and image.size == (504, 504)  # 21 px cells: floor(512 / 24)
    cells = assert_flat_cells(image, cell_edges(504, cell=21))
    assert (cells == np.asarray(sprite.convert("RGB"))).all(), "WebP output must be lossless"


def test_same_request_gives_the_same_bytes_from_the_cli_the_http_api_and_cog(
    server: CogServer, smoke_env: dict[str, str], tmp_path: Path
):
    """One delivery path (service/delivery.py): the same input is the same PNG and sprite on every surface."""
    inputs = {"prompt": "lad with a red beanie", "seed": 9, "steps": 2, "output_size": 480, "return_sprites": True}
    status, body = server.predict(**inputs)
    assert status == 200 and body["status"] == "succeeded", body
    cog_image, cog_sprite = (decode_data_url(body["output"][key][0])[1] for key in ("images", "sprites"))

    with subprocess_server(smoke_env) as url:
        response = httpx.post(f"{url}/v1/generate", json=inputs, timeout=120)
    assert response.status_code == 200, response.text
    (http_image,) = response.json()["images"]

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "generate",
            inputs["prompt"],
            "--seed",
            "9",
            "--steps",
            "2",
            "--output-size",
            "480",
            "-o",
            str(tmp_path / "punk.png"),
        ],
        env=smoke_env | {"PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr

    assert Image.open(io.BytesIO(cog_image)).size == (480, 480)
    assert cog_image == base64.b64decode(http_image["image"]) == (tmp_path / "punk.png").read_bytes()
    assert cog_sprite == base64.b64decode(http_image["sprite"]) == (tmp_path / "punk.sprite.png").read_bytes()


def test_a_variation_with_controls_gives_the_same_bytes_from_the_cli_the_http_api_and_cog(
    server: CogServer, smoke_env: dict[str, str], tmp_path: Path
):
    """Palette, transparent background and a variation of a sprite: the same PNGs (with alpha) on every surface."""
    start = tmp_path / "start.png"
    Image.fromarray(sprites.render(sprites.random_punk(np.random.default_rng(3)))).save(start)
    encoded = base64.b64encode(start.read_bytes()).decode("ascii")
    inputs = {"prompt": "lad", "seed": 4, "steps": 2, "return_sprites": True, "strength": 0.5}
    controls = {"palette": "pico-8", "background": "transparent"}
    status, body = server.predict(**inputs, **controls, image=f"data:image/png;base64,{encoded}")
    assert status == 200 and body["status"] == "succeeded", body
    cog_image, cog_sprite = (decode_data_url(body["output"][key][0])[1] for key in ("images", "sprites"))

    with subprocess_server(smoke_env) as url:
        response = httpx.post(f"{url}/v1/generate", json=inputs | controls | {"image": encoded}, timeout=120)
    assert response.status_code == 200, response.text
    (http_image,) = response.json()["images"]

    arguments = ["--seed", "4", "--steps", "2", "--strength", "0.5", "--image", str(start)]
    arguments += ["--palette", "pico-8", "--background", "transparent", "-o", str(tmp_path / "punk.png")]
    cli = subprocess.run(
        [sys.executable, "-m", "service", "generate", "lad", *arguments],
        env=smoke_env | {"PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert cog_image == base64.b64decode(http_image["image"]) == (tmp_path / "punk.png").read_bytes()
    assert cog_sprite == base64.b64decode(http_image["sprite"]) == (tmp_path / "punk.sprite.png").read_bytes()
    alpha = np.asarray(Image.open(io.BytesIO(cog_sprite)).convert("RGBA"))[..., 3]
    assert int((alpha == 0).sum()) == http_image["background_cells"] > 0


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"palette": "gameboy"}, "palette: unknown preset"),
        ({"palette": "#000000, #12"}, "palette: colour 2 is not a '#rrggbb' code"),
        ({"background": "clear"}, "background: must be 'keep', 'transparent' or a '#rrggbb' colour"),
        ({"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image: is not a complete image file"),
        ({"image": "not a url"}, "image: must be the URL of an image file"),
    ],
)
def test_bad_controls_fail_the_prediction_naming_the_field(server: CogServer, inputs: dict, message: str):
    status, body = server.predict(prompt="a punk", steps=2, **inputs)
    assert status == 200 and body["status"] == "failed" and message in body["error"], body
    assert "not an image" not in body["error"]


def test_same_seed_same_image_and_unknown_inputs_are_dropped(server: CogServer):
    """coglet strips input fields the schema does not know (with a warning in its log) instead of
    answering 422: a stray lora_scale is ignored, and the result is byte-identical."""
    inputs = {"prompt": "lass with a pink mohawk", "seed": 123, "steps": 1}
    first = server.predict(**inputs)
    second = server.predict(**inputs, lora_scale=0.3)
    assert first[0] == second[0] == 200
    assert first[1]["status"] == second[1]["status"] == "succeeded"
    assert first[1]["output"] == second[1]["output"]
    assert "Stripped unknown input fields" in server.log_tail(100_000)


def test_concurrency_is_declared():
    import predict

    assert predict.Runner.run.__cog_concurrent_max__ == COG_MAX_CONCURRENCY  # type: ignore[attr-defined]


def post_together(server: CogServer, bodies: list[tuple[str, dict]]) -> list[tuple[int, dict]]:
    """PUT /predictions/<id> for each (id, input), each on its own thread, synchronously; no retry on 409.
    Each goes once coglet has given the one before its slot: they all run together, but no two ask for a slot at
    the same instant. coglet 0.23.1 answers 409 (at capacity) to one of two requests that do, however many slots
    are free: PermitPool::try_acquire gives up when the other request holds the pool's lock (try_lock)."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = []
        for id_, inputs in bodies:
            log_offset = server.log.stat().st_size
            futures.append(pool.submit(server.request, "PUT", f"/predictions/{id_}", {"input": inputs}))
            while not (futures[-1].done() or server.has_started(id_, log_offset)):
                time.sleep(0.01)
        return [future.result() for future in futures]


def test_concurrent_predictions_all_succeed_in_shared_batches(server: CogServer):
    answers = post_together(
        server, [(f"together-{seed}", {"prompt": "a punk", "seed": seed, "steps": 2}) for seed in range(6)]
    )
    assert [status for status, _ in answers] == [200] * 6, answers  # no 409: six slots, one GPU batcher
    assert all(body["status"] == "succeeded" for _, body in answers), [body.get("error") for _, body in answers]
    assert [body["output"]["seeds"] for _, body in answers] == [[seed] for seed in range(6)]
    batch_sizes = [body["metrics"]["batch_images"] for _, body in answers]
    assert max(batch_sizes) >= 2, batch_sizes  # fewer engine calls than predictions


def test_a_cancelled_queued_prediction_is_never_rendered(server: CogServer):
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(
            server.request,
            "PUT",
            "/predictions/busy",
            {"input": {"prompt": "a punk", "seed": 1, "steps": 20, "num_outputs": 4}},
        )
        time.sleep(2)  # the busy batch is on the GPU thread now
        queued = pool.submit(server.request, "PUT", "/predictions/queued", {"input": {"prompt": "a punk", "seed": 2}})
        time.sleep(1)
        assert server.request("POST", "/predictions/queued/cancel")[0] == 200
        (busy_status, busy_body), (_, queued_body) = busy.result(), queued.result()
    assert busy_status == 200 and busy_body["status"] == "succeeded"
    assert busy_body["metrics"]["batch_images"] == 4  # rendered alone: the queued one never joined a batch
    assert queued_body["status"] == "canceled", queued_body
    assert "rendered in a batch" not in queued_body["logs"]


def test_whole_number_floats_are_taken_as_integers(server: CogServer):
    """coglet's schema check lets 5.0 through for an integer (5.5 fails inside run(): see the no-schema test)."""
    status, body = server.predict(prompt="a punk", seed=5.0, num_outputs=2.0, steps=1.0)
    assert status == 200 and body["status"] == "succeeded", body
    assert body["output"]["seeds"] == [5, 6]


class _SlowUploads(http.server.BaseHTTPRequestHandler):
    """An upload endpoint like Replicate's: PUT <url><name>, answered after a random delay, Location = the file."""

    received: list[str] = []

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append(self.path)
        time.sleep(random.random() * 0.3)
        self.send_response(201)
        self.send_header("Location", f"http://127.0.0.1/files{self.path}")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_output_order_holds_in_upload_mode(server: CogServer, smoke_env: dict[str, str], tmp_path: Path):
    """Replicate starts coglet with --upload-url; the named output keeps each file in its place on every run."""
    uploads = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowUploads)
    threading.Thread(target=uploads.serve_forever, daemon=True).start()
    upload_url = f"http://127.0.0.1:{uploads.server_address[1]}/upload/"
    uploading = CogServer("upload", smoke_env, ROOT, tmp_path, args=("--upload-url", upload_url))
    try:
        assert uploading.wait_until_settled()["status"] == "READY", uploading.log_tail()
        inputs = {"prompt": "a punk", "seed": 40, "steps": 1, "num_outputs": 3, "return_sprites": True}
        status, reference = server.predict(**inputs)
        assert status == 200, reference
        for _ in range(5):
            status, body = uploading.predict(**inputs)
            assert status == 200 and body["status"] == "succeeded", body
            assert body["output"] == reference["output"]  # images and sprites each in seed order
    finally:
        uploading.stop()
        uploads.shutdown()


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n\t "}, "prompt"),
        ({"prompt": "x" * (config.MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"steps": 2}, "prompt"),  # missing
        ({"prompt": "a punk", "steps": 0}, "steps"),
        ({"prompt": "a punk", "steps": config.MAX_STEPS + 1}, "steps"),
        ({"prompt": "a punk", "steps": "many"}, "steps"),
        ({"prompt": "a punk", "steps": 2.5}, "steps"),
        ({"prompt": "a punk", "num_outputs": 5}, "num_outputs"),
        ({"prompt": "a punk", "num_outputs": 0}, "num_outputs"),
        ({"prompt": "a punk", "guidance": 20.5}, "guidance"),
        ({"prompt": "a punk", "seed": -1}, "seed"),
        ({"prompt": "a punk", "seed": MAX_SEED + 1}, "seed"),
        ({"prompt": "a punk", "output_size": 10}, "output_size"),
        ({"prompt": "a punk", "output_format": "gif"}, "output_format"),
        ({"prompt": "a punk", "return_sprites": "yes"}, "return_sprites"),
        ({"prompt": "a punk", "lora": 3}, "lora"),
        ({"prompt": "a punk", "strength": 1.5}, "strength"),
    ],
)
def test_invalid_input_is_a_422_naming_the_field(server: CogServer, inputs: dict, field: str):
    status, body = server.predict(**inputs)
    assert status == 422, body
    assert {tuple(error["loc"]) for error in body["detail"]} == {("body", "input", field)}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"prompt": "   "}, "prompt: must not be empty"),
        ({"prompt": "a punk", "num_outputs": 5}, "num_outputs: must be between 1 and 4"),
        ({"prompt": "a punk", "steps": 1, "output_size": 10}, "output_size: must be between 24 and 4096"),
        ({"prompt": "a punk", "steps": 1, "lora": "../bespoke_punks"}, "lora: unknown LoRA"),
        ({"prompt": "a punk", "steps": 1, "seed": 2.5}, "seed: must be a whole number"),
    ],
)
def test_without_schema_bad_input_is_a_failed_prediction(cog_servers, inputs: dict, message: str):
    """Belt and braces: what the schema would stop still fails cleanly inside run()."""
    server = cog_servers["no_schema"]
    assert server.wait_until_settled()["status"] == "READY"
    status, body = server.predict(**inputs)
    assert status == 200 and body["status"] == "failed"
    assert message in body["error"]
    assert server.wait_until_settled()["status"] == "READY" and server.process.poll() is None


def test_setup_without_weights_fails_naming_the_missing_files(cog_servers):
    server = cog_servers["no_weights"]
    health = server.wait_until_settled()
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    assert "missing weights" in logs
    assert "v1-5-pruned-emaonly.safetensors" in logs and "bespoke_punks.safetensors" in logs
    status, body = server.predict(prompt="a punk")
    assert status == 503 and body["status"] == "failed"


# --- lora_url through the real cog server, from a local http.server -----------------------------------------------


@pytest.fixture(scope="module")
def lora_urls(http_files) -> tuple[str, Path, list[str]]:
    """http_files plus LoRAs: good.safetensors (a random rank-32 kohya LoRA for the smoke model), sdxl.safetensors
    (SDXL-shaped) and real-sd15.safetensors (SD1.5's real widths: no layer of the smoke model has them)."""
    from safetensors.torch import save_file

    from devtools.random_lora import kohya_metadata, random_kohya_lora
    from devtools.smoke import build_smoke_pipeline
    from tests.lora_files import sd15_modules, sdxl_modules, write_lora

    base, folder, requests = http_files
    save_file(
        random_kohya_lora(build_smoke_pipeline(), seed=3),
        str(folder / "good.safetensors"),
        metadata=kohya_metadata(32, 16),
    )
    write_lora(folder / "sdxl.safetensors", sdxl_modules())
    write_lora(folder / "real-sd15.safetensors", sd15_modules())
    return base, folder, requests


def guard_message(path: Path) -> str:
    """What the start-up LoRA guard says of the file, less its path (the server names its cached copy)."""
    from devtools.smoke import build_smoke_pipeline
    from service.lora.fuse import check_lora_matches_model
    from service.lora.inspect import LoraError, inspect_sd15_lora

    with pytest.raises(LoraError) as refused:
        check_lora_matches_model(build_smoke_pipeline(), inspect_sd15_lora(path, 32))
    return str(refused.value).replace(str(path), "")


@pytest.mark.parametrize(
    ("name", "what"), [("sdxl.safetensors", "is a SDXL LoRA"), ("real-sd15.safetensors", "but the model's layer is")]
)
def test_lora_url_to_a_wrong_file_fails_with_the_guards_message(server: CogServer, lora_urls, name: str, what: str):
    base, folder, _ = lora_urls
    status, body = server.predict(prompt="a punk", steps=1, lora_url=f"{base}/{name}?sig=secret")
    assert status == 200 and body["status"] == "failed", body
    error = body["error"]
    assert f"lora_url: {base}/{name}" in error and what in error  # coglet puts "Prediction failed: ..." first
    assert guard_message(folder / name) in error and "secret" not in error
    assert "lora-url-cache" not in error and "<path>" not in error  # the URL named, never the server's file
    assert "rendered in a batch" not in body["logs"]


def test_lora_url_to_a_good_file_is_fused_and_cached(server: CogServer, lora_urls):
    base, _, requests = lora_urls
    inputs = {"prompt": "lad with a red beanie", "seed": 5, "steps": 1}
    status, default = server.predict(**inputs)
    assert status == 200 and default["status"] == "succeeded", default
    downloads = lambda: [r for r in requests if r.startswith("/good.safetensors")]  # noqa: E731
    before = len(downloads())
    first = server.predict(**inputs, lora_url=f"{base}/good.safetensors")
    second = server.predict(**inputs, lora_url=f"{base}/good.safetensors")
    for status, body in (first, second):
        assert status == 200 and body["status"] == "succeeded", body.get("error") or body
        assert f"lora_url: {base}/good.safetensors: SD1.5 LoRA" in body["logs"]
    assert len(downloads()) == before + 1  # the second prediction used the cached file
    assert first[1]["output"] == second[1]["output"]
    assert first[1]["output"]["images"] != default["output"]["images"]  # the URL's LoRA was fused
    assert server.predict(**inputs)[1]["output"] == default["output"]  # and the default one is back


def test_lora_and_lora_url_together_fail_naming_both(server: CogServer, lora_urls):
    base, _, _ = lora_urls
    status, body = server.predict(prompt="a punk", lora="other", lora_url=f"{base}/good.safetensors")
    assert status == 200 and body["status"] == "failed"
    assert "lora_url: give either lora (a served name) or lora_url, not both" in body["error"]


def test_lora_url_is_refused_where_the_cache_is_off(cog_servers, lora_urls):
    server = cog_servers["no_schema"]  # PUNKS_LORA_URL_CACHE_SIZE unset: 0
    assert server.wait_until_settled()["status"] == "READY"
    status, body = server.predict(prompt="a punk", lora_url=f"{lora_urls[0]}/good.safetensors")
    assert status == 200 and body["status"] == "failed"
    assert "lora_url: not enabled on this deployment (PUNKS_LORA_URL_CACHE_SIZE is 0)" in body["error"]


def test_lora_url_never_reaches_internal_hosts(server: CogServer):
    """Directly, through a redirect, or to FTP: refused naming the host and the rule, the internal host untouched."""
    with canary() as internal, canary() as ftp, hostile_server() as (base, _):
        cases = [
            (f"http://{INTERNAL_HOST}:{internal.port}/x.safetensors", "not a public address (loopback)"),
            (f"http://localhost:{internal.port}/x.safetensors", "not a public address (loopback)"),
            (f"{base}/redirect?to=http://{INTERNAL_HOST}:{internal.port}/x.safetensors", "not a public address"),
            (f"{base}/redirect?to=ftp://{INTERNAL_HOST}:{ftp.port}/x.safetensors", "redirect to a non-http(s) URL"),
        ]
        for url, rule in cases:
            status, body = server.predict(prompt="a punk", steps=1, lora_url=url)
            assert status == 200 and body["status"] == "failed", body
            assert rule in body["error"] and str(internal.port) not in body["error"].replace(url, "")
        assert internal.hits == 0 and ftp.hits == 0


def test_slow_lora_urls_hold_up_no_other_prediction_and_stop_when_cancelled(server: CogServer):
    """Six predictions whose lora_url sends a byte a second (under the stall timeout, no rate floor here): a plain
    prediction is still served at once, and cancelling them stops their downloads."""
    with hostile_server(slow_every_s=1.0) as (base, stats), ThreadPoolExecutor(6) as pool:
        slow = [
            pool.submit(
                server.request,
                "PUT",
                f"/predictions/slow-{i}",
                {"input": {"prompt": "a punk", "steps": 1, "lora_url": f"{base}/slow?{i}"}},
            )
            for i in range(6)
        ]
        deadline = time.monotonic() + 30
        while stats.dribbling < 4:  # the download threads are all busy; two more predictions wait for one
            assert time.monotonic() < deadline, "the slow downloads never started"
            time.sleep(0.1)
        started = time.monotonic()
        status, plain = server.predict(prompt="a punk", seed=3, steps=1)
        assert status == 200 and plain["status"] == "succeeded", plain
        assert time.monotonic() - started < 30
        for i in range(6):
            assert server.request("POST", f"/predictions/slow-{i}/cancel")[0] == 200
        assert [future.result(timeout=60)[1]["status"] for future in slow] == ["canceled"] * 6
        deadline = time.monotonic() + 15  # the stall timeout (5 s) bounds how long a cancelled download runs on
        while stats.dribbling:
            assert time.monotonic() < deadline, f"{stats.dribbling} downloads still running after cancel"
            time.sleep(0.2)
    status, after = server.predict(prompt="a punk", seed=3, steps=1)
    assert status == 200 and after["output"] == plain["output"]


def test_a_lora_url_serves_only_the_requests_naming_it(server: CogServer, lora_urls):
    """Its cache name is no LoRA another caller can pick, nor listed in the unknown-LoRA error."""
    base, _, _ = lora_urls
    status, body = server.predict(prompt="a punk", seed=4, steps=1, lora_url=f"{base}/good.safetensors")
    assert status == 200 and body["status"] == "succeeded", body
    cache_names = {path.stem for path in server.log.parent.glob("lora-url-cache/url-*.safetensors")}
    assert cache_names  # the file is cached under a name
    for name in cache_names:
        status, body = server.predict(prompt="a punk", seed=4, steps=1, lora=name)
        assert status == 200 and body["status"] == "failed"
        assert "unknown LoRA" in body["error"] and "url-" not in body["error"].replace(name, "")


def test_cog_errors_name_no_server_path(server: CogServer):
    status, body = server.predict(prompt="a punk", steps=1, lora="nope")
    assert status == 200 and body["status"] == "failed"
    assert "lora: unknown LoRA 'nope'; allowed: bespoke_punks" in body["error"]
    assert not re.search(r"/tmp|/\w+/\w+/", body["error"]), body["error"]


def test_a_lora_with_nan_values_fails_the_prediction_naming_the_url(server: CogServer, lora_urls):
    from safetensors.torch import load_file, save_file

    from devtools.random_lora import kohya_metadata

    base, folder, _ = lora_urls
    tensors = load_file(str(folder / "good.safetensors"))
    first_alpha = next(key for key in tensors if key.endswith(".alpha"))
    tensors[first_alpha] = torch_nan_like(tensors[first_alpha])
    save_file(tensors, str(folder / "nan.safetensors"), metadata=kohya_metadata(32, 16))
    status, body = server.predict(prompt="a punk", steps=1, lora_url=f"{base}/nan.safetensors")
    assert status == 200 and body["status"] == "failed"
    assert f"lora_url: {base}/nan.safetensors: tensor {first_alpha} holds NaN or infinite values" in body["error"]


def torch_nan_like(tensor):
    import torch

    return torch.full_like(tensor, float("nan"))


# --- weights download (service/weights/fetch.py) against a local http.server --------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_files(tmp_path_factory: pytest.TempPathFactory, smoke_dir: Path):
    """(base URL, served folder, request log): a loopback server over a folder holding the smoke model."""
    folder = tmp_path_factory.mktemp("served")
    (folder / "a.bin").write_bytes(os.urandom(3 * (1 << 20) + 17))  # a few chunks
    (folder / "b.bin").write_bytes(b"the LoRA, say")
    (folder / "smoke").symlink_to(smoke_dir, target_is_directory=True)
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer((ALLOWED_HOST, 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://{ALLOWED_HOST}:{httpd.server_address[1]}", folder, requests
    httpd.shutdown()
    httpd.server_close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_parse_spec():
    digest = "ab" * 32
    files = parse_spec(
        f" a.safetensors=https://h/a.safetensors#sha256={digest.upper()},sub/b.bin=http://h:8080/b?x=1\n c=https://h/c "
    )
    assert files == [
        WeightFile("a.safetensors", "https://h/a.safetensors", digest),
        WeightFile("sub/b.bin", "http://h:8080/b?x=1", None),
        WeightFile("c", "https://h/c", None),
    ]
    for bad, message in [
        ("nourl", "expected dest=url"),
        ("a=https://h/a#sha256=123", "64 hex digits"),
        ("a=https://h/a#md5=" + digest, "64 hex digits"),
        ("/etc/a=https://h/a", "inside the weights folder"),
        ("../a=https://h/a", "inside the weights folder"),
        ("a=ftp://h/a", "only http(s)"),
        ("a=https://h/1 a=https://h/2", "listed twice"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_spec(bad)
    assert redact("https://user:pw@h:8443/a/b.bin?X-Amz-Signature=secret#frag") == "https://h:8443/a/b.bin"


def test_download_in_parallel_with_checksums_then_skip_what_is_there(http_files, tmp_path: Path):
    base, folder, requests = http_files
    weights = tmp_path / "weights"
    files = [
        WeightFile("big/a.bin", f"{base}/a.bin", sha256(folder / "a.bin")),
        WeightFile("b.bin", f"{base}/b.bin", sha256(folder / "b.bin")),
        WeightFile("unchecked.bin", f"{base}/b.bin"),
    ]
    paths = fetch_weights(files, weights, workers=3)
    assert paths == [weights / "big/a.bin", weights / "b.bin", weights / "unchecked.bin"]
    assert (weights / "big/a.bin").read_bytes() == (folder / "a.bin").read_bytes()
    assert (weights / "unchecked.bin").read_bytes() == b"the LoRA, say"
    assert not list(weights.rglob("*.part"))
    # again: everything is there (checksums match, or none given): nothing is downloaded
    before = len(requests)
    fetch_weights(files, weights)
    assert len(requests) == before
    # a corrupted file with a pinned checksum is downloaded again
    (weights / "b.bin").write_bytes(b"corrupt")
    fetch_weights(files, weights)
    assert requests[before:] == ["/b.bin"]
    assert (weights / "b.bin").read_bytes() == b"the LoRA, say"


def test_checksum_mismatch_removes_the_file_and_names_the_pinned_checksum(http_files, tmp_path: Path):
    base, folder, _ = http_files
    wrong = "0" * 64
    files = [WeightFile("a.bin", f"{base}/a.bin?token=secret", wrong), WeightFile("b.bin", f"{base}/b.bin")]
    with pytest.raises(FetchError) as raised:
        fetch_weights(files, tmp_path)
    message = str(raised.value)
    assert "1 of 2 weight files failed" in message and "a.bin: checksum mismatch" in message
    assert wrong in message and "removed" in message
    assert sha256(folder / "a.bin") not in message  # no hash of what a URL served: the download policy's rule
    assert "secret" not in message
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.bin.part").exists()
    assert (tmp_path / "b.bin").is_file()  # the others still complete


def test_http_error_is_named(http_files, tmp_path: Path):
    base, _, _ = http_files
    with pytest.raises(
        FetchError, match=r"^1 of 1 weight files failed:\n  missing\.bin: 127\.0\.0\.2: answered HTTP 404$"
    ):
        fetch_weights([WeightFile("missing.bin", f"{base}/nothing-here?sig=secret")], tmp_path)
    assert not list(tmp_path.iterdir())


def test_nothing_to_fetch_without_the_variable(tmp_path: Path):
    assert fetch_weights_from_env(tmp_path / "w", environ={}) == []
    assert fetch_weights_from_env(tmp_path / "w", environ={"PUNKS_WEIGHTS_URLS": "  "}) == []
    assert not (tmp_path / "w").exists()


# --- the runner in-process: setup downloads, run() writes the files -------------------------------


def runner_env(monkeypatch: pytest.MonkeyPatch, weights: Path, urls: str) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(weights.parent))  # the runner's output files
    for name in [n for n in os.environ if n.startswith("PUNKS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PUNKS_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("PUNKS_ALLOW_SMOKE_MODEL", "false")
    monkeypatch.setenv("PUNKS_DEVICE", "cpu")
    monkeypatch.setenv("PUNKS_WEIGHTS_URLS", urls)


def test_setup_downloads_the_weights_then_run_writes_images_then_sprites(
    http_files, smoke_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import predict

    base, _, _ = http_files
    sources = [
        p for p in smoke_dir.rglob("*") if p.is_file() and p.relative_to(smoke_dir).parts[0] != "v1-5-smoke.safetensors"
    ]
    urls = ",".join(
        f"{p.relative_to(smoke_dir)}={base}/smoke/{p.relative_to(smoke_dir)}#sha256={sha256(p)}" for p in sources
    )
    runner_env(monkeypatch, tmp_path / "weights", urls)
    monkeypatch.setattr(predict, "KEPT_OUTPUT_FOLDERS", 1)
    runner = predict.Runner()
    inputs = {
        "prompt": "a punk",
        "seed": 5,
        "num_outputs": 2,
        "steps": 1,
        "guidance": 7.5,
        "output_size": 1024,
        "integer_scale": False,
        "return_sprites": True,
        "output_format": "png",
        "lora": "",
        "lora_url": "",
        "scheduler": None,
        "palette": "",
        "background": "keep",
        "image": None,
        "strength": 0.6,
    }

    async def setup_then_run_twice():  # as coglet does: setup and every run on one event loop
        await runner.setup()
        first = await runner.run(**inputs)
        sizes = [Image.open(p).size for p in first.images + first.sprites]
        return first, sizes, await runner.run(**inputs | {"num_outputs": 1, "output_size": 48, "return_sprites": False})

    output, sizes, again = asyncio.run(setup_then_run_twice())
    assert not runner.engine.is_smoke  # loaded the downloaded files as real weights
    assert runner.engine.weights.base_model == tmp_path / "weights" / "stable-diffusion-v1-5"
    assert [Path(p).name for p in output.images + output.sprites] == [
        "punk-1.png",
        "punk-2.png",
        "punk-1.sprite.png",
        "punk-2.sprite.png",
    ]
    assert sizes == [(1024, 1024)] * 2 + [(GRID, GRID)] * 2
    assert output.seeds == [5, 6] and output.smooth is None and again.sprites is None
    # with KEPT_OUTPUT_FOLDERS 1, the next prediction removed this one's files (sent by then)
    assert not any(Path(p).exists() for p in output.images) and Image.open(again.images[0]).size == (48, 48)


def test_setup_fails_on_a_bad_checksum_before_loading(http_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from predict import Runner

    base, _, _ = http_files
    runner_env(monkeypatch, tmp_path / "weights", f"bespoke_punks.safetensors={base}/b.bin#sha256={'1' * 64}")
    with pytest.raises(FetchError, match="bespoke_punks.safetensors: checksum mismatch"):
        asyncio.run(Runner().setup())
    assert not (tmp_path / "weights" / "bespoke_punks.safetensors").exists()


def test_setup_without_weights_names_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from predict import Runner

    runner_env(monkeypatch, tmp_path / "weights", "")
    with pytest.raises(WeightsError, match=r"missing weights: .*stable-diffusion-v1-5.*bespoke_punks\.safetensors"):
        asyncio.run(Runner().setup())
