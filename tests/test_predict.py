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
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from devtools.cog_schema import ROOT, SCHEMA_PATH, build_schema, is_current
from service import config, samplers
from service.config import MAX_SEED, Settings
from service.errors import WeightsError
from service.samplers import SAMPLER_NAMES
from service.weights.fetch import FetchError, WeightFile, fetch_listed_weights, fetch_weights, parse_spec, redact
from service.weights.files import format_size
from tests.hostile_hosts import ALLOWED_HOST, ALLOWED_NETWORKS_ENV, INTERNAL_HOST, canary, hostile_server
from tests.live_server import subprocess_server
from train import sprites

GRID = 24
COG_MAX_CONCURRENCY = 8  # predict.py's @cog.concurrent(max=8); test_concurrency_is_declared checks it
SERVER_START_S = 180
HUB_TOKEN = "hf_caller_token"


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


class _FileStore(http.server.BaseHTTPRequestHandler):
    """An upload endpoint like Replicate's file store: PUT <upload url><name>, answered after a random delay
    (uploads end in any order), Location = a URL of its own under which GET serves the bytes."""

    files: dict[str, bytes] = {}
    lock = threading.Lock()

    def do_PUT(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            location = f"/files/{len(self.files)}/{self.path.rsplit('/', 1)[-1]}"
            self.files[location] = data
        time.sleep(random.random() * 0.2)
        self.send_response(201)
        self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}{location}")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class CogServer:
    """`python -m cog.server.http` (coglet), as `cog build` images start it, on a loopback port; with `store`, in
    upload mode (--upload-url, as Replicate starts it) against that loopback file store."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        cwd: Path,
        log_dir: Path,
        runner_ref: str = "predict.py:Runner",
        store: http.server.ThreadingHTTPServer | None = None,
        args: tuple[str, ...] = (),
        concurrency: int = COG_MAX_CONCURRENCY,  # 1 for a sync runner (trainer.py's train)
    ):
        self.port = free_port()
        self.store = store
        if store:
            args += ("--upload-url", f"http://127.0.0.1:{store.server_address[1]}/upload/")
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

    def files(self, body: dict) -> dict[str, bytes]:
        """A succeeded prediction's output (a list of uploaded file URLs, in any order): file name -> bytes."""
        assert body["status"] == "succeeded", body.get("error") or body
        assert self.store is not None and all(url.startswith("http://127.0.0.1:") for url in body["output"])
        files = {}
        for url in body["output"]:
            location = urllib.parse.urlsplit(url).path
            files[location.rsplit("/", 1)[-1]] = self.store.RequestHandlerClass.files[location]  # type: ignore[attr-defined]
        assert len(files) == len(body["output"]), body["output"]  # one name per file
        return files

    def images(self, **inputs) -> dict[str, bytes]:
        """Predict (it must succeed): its files by name."""
        status, body = self.predict(**inputs)
        assert status == 200, body
        return self.files(body)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def cog_servers(smoke_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, http_files):
    """Three servers, started together (they load in parallel), each test waits for the one it uses:
    ready: the committed schema and the smoke model, as on Replicate but without weights (lora_weights on, as
    cog.yaml), in upload mode against a loopback file store,
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
        "HF_ENDPOINT": http_files[0],  # the Hub's files (hf://, owner/repo/file) from the loopback server
    }
    snap_processes = {"PUNKS_SNAP_PROCESSES": "2"}
    handler = type("Store", (_FileStore,), {"files": {}, "lock": threading.Lock()})
    store = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=store.serve_forever, daemon=True).start()
    servers = {
        "ready": CogServer("ready", smoke_env | lora_url_cache | snap_processes, ROOT, logs, store=store),
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
    store.shutdown()


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
    assert bounds("num_inference_steps") == (config.MIN_STEPS, config.MAX_STEPS)
    assert bounds("guidance_scale") == (config.MIN_GUIDANCE, config.MAX_GUIDANCE)
    assert bounds("lora_scale") == (config.MIN_LORA_SCALE, config.MAX_LORA_SCALE)
    assert bounds("output_size") == field_bounds("output_size")
    assert props["negative_prompt"]["maxLength"] == config.MAX_PROMPT_CHARS
    # real defaults in the form, each the service's own default setting
    defaults = {name: prop.get("default") for name, prop in props.items()}
    assert defaults["num_inference_steps"] == fields["steps"].default
    assert defaults["guidance_scale"] == fields["guidance"].default
    assert defaults["lora_scale"] == fields["lora_scale"].default
    assert defaults["output_size"] == fields["output_size"].default
    assert defaults["integer_scale"] is fields["integer_scale"].default
    assert defaults["scheduler"] == samplers.DEFAULTS[fields["scheduler"].default]
    assert defaults["negative_prompt"] == defaults["lora_weights"] == defaults["lora"] == ""
    assert schema["components"]["schemas"]["output_format"]["enum"] == ["png", "webp"]
    assert schema["components"]["schemas"]["scheduler"]["enum"] == list(SAMPLER_NAMES)  # service/samplers.py's
    assert bounds("strength") == (config.MIN_STRENGTH, config.MAX_STRENGTH)
    assert props["strength"]["default"] == config.DEFAULT_STRENGTH
    # a string run() fetches under the download policy: with format uri, coglet would fetch any URL itself
    assert props["image"]["type"] == "string" and "format" not in props["image"]
    assert f"up to {config.MAX_PALETTE_COLORS} '#rrggbb'" in props["palette"]["description"]
    assert (
        f"at most {config.MAX_IMAGE_SIDE} px a side and {config.MAX_IMAGE_BYTES // 2**20} MiB"
        in props["image"]["description"]
    )
    assert props["hf_api_token"]["x-cog-secret"] is True and props["hf_api_token"]["format"] == "password"
    assert "steps" not in props and "guidance" not in props and "lora_url" not in props  # renamed, no aliases
    assert all(prop.get("description") for prop in props.values())
    # Replicate's convention: a list of files (a gallery on the web, `for f in output` in the client)
    assert schema["components"]["schemas"]["Output"] == {
        "title": "Output",
        "type": "array",
        "items": {"type": "string", "format": "uri"},
    }


# --- through the real cog server -----------------------------------------------------------------------


def test_serves_the_committed_schema(server: CogServer):
    status, served = server.request("GET", "/openapi.json")
    assert status == 200
    assert (
        served["components"]["schemas"]["Input"]
        == json.loads(SCHEMA_PATH.read_text())["components"]["schemas"]["Input"]
    )


def test_prediction_uploads_one_file_per_image_named_by_index_and_seed(server: CogServer):
    """Upload mode, as on Replicate: N images are N uploads, the JSON lists their URLs (no data), and each name
    carries its index and seed, so the order is restored by sorting whatever order the uploads ended in."""
    uploads_before = len(server.store.RequestHandlerClass.files)  # type: ignore[union-attr, attr-defined]
    status, body = server.predict(
        prompt="lad with a red beanie, green background", seed=7, num_outputs=2, num_inference_steps=2
    )
    assert status == 200
    files = server.files(body)
    assert sorted(files) == ["out-0-seed7.png", "out-1-seed8.png"]
    assert len(server.store.RequestHandlerClass.files) == uploads_before + 2  # type: ignore[union-attr, attr-defined]
    assert "data:" not in json.dumps(body["output"])
    for data in files.values():
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (1024, 1024)
        assert_flat_cells(image, cell_edges(1024))
    # one log line per image, with its file name, seed and quality signals; the seeds are metrics too
    lines = [line for line in body["logs"].splitlines() if line.startswith("out-")]
    assert len(lines) == 2
    assert lines[0].startswith("out-0: seed 7: ") and lines[1].startswith("out-1: seed 8: ")
    assert all("grid fit" in line and "colours" in line for line in lines)
    assert body["metrics"]["seeds"] == [7, 8] and len(body["metrics"]["pixel_art"]) == 2
    assert "SMOKE model" in body["logs"]


def test_sprites_are_further_files_named_after_their_portrait(server: CogServer):
    files = server.images(prompt="a punk", seed=40, num_inference_steps=1, num_outputs=3, return_sprites=True)
    portraits = [f"out-{i}-seed{40 + i}" for i in range(3)]
    assert sorted(files) == sorted([f"{p}.png" for p in portraits] + [f"{p}-sprite.png" for p in portraits])
    for portrait in portraits:
        image, sprite = (Image.open(io.BytesIO(files[name])) for name in (f"{portrait}.png", f"{portrait}-sprite.png"))
        assert sprite.size == (GRID, GRID)
        cells = assert_flat_cells(image, cell_edges(1024))
        assert (cells == np.asarray(sprite.convert("RGB"))).all(), "the sprite is not its portrait's cells"
    again = server.images(prompt="a punk", seed=40, num_inference_steps=1, num_outputs=3, return_sprites=True)
    assert again == files  # the same bytes under the same names, whatever order the uploads ended in


def test_webp_and_integer_scale(server: CogServer):
    files = server.images(
        prompt="a punk",
        seed=3,
        num_inference_steps=1,
        output_format="webp",
        output_size=512,
        integer_scale=True,
        return_sprites=True,
    )
    assert sorted(files) == ["out-0-seed3-sprite.webp", "out-0-seed3.webp"]
    image, sprite = (Image.open(io.BytesIO(files[name])) for name in ("out-0-seed3.webp", "out-0-seed3-sprite.webp"))
    assert image.format == sprite.format == "WEBP" and image.size == (504, 504)  # 21 px cells: floor(512 / 24)
    cells = assert_flat_cells(image, cell_edges(504, cell=21))
    assert (cells == np.asarray(sprite.convert("RGB"))).all(), "WebP output must be lossless"


def same_bytes_on_every_surface(
    server: CogServer, smoke_env: dict[str, str], tmp_path: Path, inputs: dict, http: dict, cog: dict, cli: list[str]
) -> tuple[bytes, dict]:
    """`inputs` (with `seed` and return_sprites) through Cog (plus `cog`), the HTTP API (plus `http`) and the CLI
    (`cli`, its flags beyond the prompt): the portrait and sprite must be the same bytes on all three. Returns Cog's
    sprite and the HTTP API's image entry."""
    files = server.images(**inputs, **cog)
    stem = f"out-0-seed{inputs['seed']}"
    cog_image, cog_sprite = files[f"{stem}.png"], files[f"{stem}-sprite.png"]

    with subprocess_server(smoke_env) as url:
        response = httpx.post(f"{url}/v1/generate", json=inputs | http, timeout=120)
    assert response.status_code == 200, response.text
    (http_image,) = response.json()["images"]

    command = [sys.executable, "-m", "service", "generate", inputs["prompt"], *cli, "-o", str(tmp_path / "punk.png")]
    done = subprocess.run(
        command,
        env=smoke_env | {"PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert cog_image == base64.b64decode(http_image["image"]) == (tmp_path / "punk.png").read_bytes()
    assert cog_sprite == base64.b64decode(http_image["sprite"]) == (tmp_path / "punk.sprite.png").read_bytes()
    return cog_sprite, http_image


def test_same_request_gives_the_same_bytes_from_the_cli_the_http_api_and_cog(
    server: CogServer, smoke_env: dict[str, str], tmp_path: Path
):
    """One delivery path (service/delivery.py): the same input is the same PNG and sprite on every surface."""
    inputs = {
        "prompt": "lad with a red beanie",
        "seed": 9,
        "num_inference_steps": 2,
        "output_size": 480,
        "return_sprites": True,
    }
    cli = ["--seed", "9", "--num-inference-steps", "2", "--output-size", "480"]
    same_bytes_on_every_surface(server, smoke_env, tmp_path, inputs, {}, {}, cli)
    assert Image.open(tmp_path / "punk.png").size == (480, 480)


def test_a_variation_with_controls_gives_the_same_bytes_from_the_cli_the_http_api_and_cog(
    server: CogServer, smoke_env: dict[str, str], tmp_path: Path, http_files
):
    """Palette, transparent background and a variation of a sprite: the same PNGs (with alpha) on every surface,
    and on Cog the same whether the image comes as a data: URL or from a URL (a signed one: its query is no file)."""
    start = tmp_path / "start.png"
    Image.fromarray(sprites.render(sprites.random_punk(np.random.default_rng(3)))).save(start)
    encoded = base64.b64encode(start.read_bytes()).decode("ascii")
    inputs = {"prompt": "lad", "seed": 4, "num_inference_steps": 2, "return_sprites": True, "strength": 0.5}
    inputs |= {"palette": "pico-8", "background": "transparent"}
    cli = ["--seed", "4", "--num-inference-steps", "2", "--strength", "0.5", "--image", str(start)]
    cli += ["--palette", "pico-8", "--background", "transparent"]
    cog_sprite, http_image = same_bytes_on_every_surface(
        server,
        smoke_env,
        tmp_path,
        inputs,
        http={"image": encoded},
        cog={"image": f"data:image/png;base64,{encoded}"},
        cli=cli,
    )
    alpha = np.asarray(Image.open(io.BytesIO(cog_sprite)).convert("RGBA"))[..., 3]
    assert int((alpha == 0).sum()) == http_image["background_cells"] > 0
    base, folder, _ = http_files
    shutil.copy(start, folder / "start.png")
    fetched = server.images(**inputs, image=f"{base}/start.png?signature=s3cret")
    assert fetched == server.images(**inputs, image=f"data:image/png;base64,{encoded}")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"palette": "gameboy"}, "palette: unknown preset"),
        ({"palette": "#000000, #12"}, "palette: colour 2 is not a '#rrggbb' code"),
        ({"background": "clear"}, "background: must be 'keep', 'transparent' or a '#rrggbb' colour"),
        ({"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image: is not a complete image file"),
        ({"image": "not a url"}, "image: must be an https:// URL or a data: URL of the file"),
    ],
)
def test_bad_controls_fail_the_prediction_naming_the_field(server: CogServer, inputs: dict, message: str):
    status, body = server.predict(prompt="a punk", num_inference_steps=2, **inputs)
    assert status == 200 and body["status"] == "failed" and message in body["error"], body
    assert "not an image" not in body["error"]


def test_unknown_inputs_are_dropped_by_coglet(server: CogServer):
    """coglet 0.23 strips input fields the schema does not know (a warning in its own log, none in the prediction's)
    instead of answering 422, and the runner never sees them: an old name such as `steps` changes nothing. The
    README says so; the same seed gives the same bytes."""
    inputs = {"prompt": "lass with a pink mohawk", "seed": 123, "num_inference_steps": 1}
    first = server.images(**inputs)
    second = server.images(**inputs, steps=3, guidance=1.0)
    assert first == second
    assert "Stripped unknown input fields" in server.log_tail(100_000)


def test_inputs_change_the_output(server: CogServer, lora_urls):
    """num_inference_steps, guidance_scale, negative_prompt and lora_scale each reach the engine."""
    base = {"prompt": "lad with a red beanie", "seed": 21, "num_inference_steps": 1}
    (reference,) = server.images(**base).values()
    changed = {
        "num_inference_steps": {"num_inference_steps": 2},
        "guidance_scale": {"guidance_scale": 20.0},
        "negative_prompt": {"negative_prompt": "hat, glasses", "guidance_scale": 20.0},
        "lora_scale": {"lora_scale": 0.0},
    }
    for name, inputs in changed.items():
        (image,) = server.images(**base | inputs).values()
        assert image != reference, name
    (strong,) = server.images(**base, guidance_scale=20.0).values()
    (negative,) = server.images(**base, guidance_scale=20.0, negative_prompt="hat, glasses").values()
    assert negative != strong  # the negative prompt, not the guidance alone


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
        server,
        [(f"together-{seed}", {"prompt": "a punk", "seed": seed, "num_inference_steps": 2}) for seed in range(6)],
    )
    assert [status for status, _ in answers] == [200] * 6, answers  # no 409: six slots, one GPU batcher
    assert all(body["status"] == "succeeded" for _, body in answers), [body.get("error") for _, body in answers]
    assert [body["metrics"]["seeds"] for _, body in answers] == [[seed] for seed in range(6)]
    assert [list(server.files(body)) for _, body in answers] == [[f"out-0-seed{seed}.png"] for seed in range(6)]
    batch_sizes = [body["metrics"]["batch_images"] for _, body in answers]
    assert max(batch_sizes) >= 2, batch_sizes  # fewer engine calls than predictions


def test_a_cancelled_queued_prediction_is_never_rendered(server: CogServer):
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(
            server.request,
            "PUT",
            "/predictions/busy",
            {"input": {"prompt": "a punk", "seed": 1, "num_inference_steps": 20, "num_outputs": 4}},
        )
        time.sleep(2)  # the busy batch is on the GPU thread now
        queued = pool.submit(
            server.request,
            "PUT",
            "/predictions/queued",
            {"input": {"prompt": "a punk", "seed": 2, "num_inference_steps": 2}},
        )
        time.sleep(1)
        assert server.request("POST", "/predictions/queued/cancel")[0] == 200
        (busy_status, busy_body), (_, queued_body) = busy.result(), queued.result()
    assert busy_status == 200 and busy_body["status"] == "succeeded"
    assert busy_body["metrics"]["batch_images"] == 4  # rendered alone: the queued one never joined a batch
    assert queued_body["status"] == "canceled", queued_body
    assert "rendered in a batch" not in queued_body["logs"]


def test_whole_number_floats_are_taken_as_integers(server: CogServer):
    """coglet's schema check lets 5.0 through for an integer (5.5 fails inside run(): see the no-schema test)."""
    status, body = server.predict(prompt="a punk", seed=5.0, num_outputs=2.0, num_inference_steps=1.0)
    assert status == 200 and body["status"] == "succeeded", body
    assert body["metrics"]["seeds"] == [5, 6] and sorted(server.files(body)) == ["out-0-seed5.png", "out-1-seed6.png"]


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n\t "}, "prompt"),
        ({"prompt": "x" * (config.MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"num_inference_steps": 2}, "prompt"),  # missing
        ({"prompt": "a punk", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a punk", "num_inference_steps": config.MAX_STEPS + 1}, "num_inference_steps"),
        ({"prompt": "a punk", "num_inference_steps": "many"}, "num_inference_steps"),
        ({"prompt": "a punk", "num_inference_steps": 2.5}, "num_inference_steps"),
        ({"prompt": "a punk", "num_outputs": 5}, "num_outputs"),
        ({"prompt": "a punk", "num_outputs": 0}, "num_outputs"),
        ({"prompt": "a punk", "guidance_scale": 20.5}, "guidance_scale"),
        ({"prompt": "a punk", "lora_scale": 2.5}, "lora_scale"),
        ({"prompt": "a punk", "negative_prompt": "x" * (config.MAX_PROMPT_CHARS + 1)}, "negative_prompt"),
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
        ({"prompt": "a punk", "num_inference_steps": 1, "output_size": 10}, "output_size: must be between 24 and 4096"),
        ({"prompt": "a punk", "num_inference_steps": 1, "lora": "../bespoke_punks"}, "lora: unknown LoRA"),
        ({"prompt": "a punk", "num_inference_steps": 1, "seed": 2.5}, "seed: must be a whole number"),
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
    status, body = server.predict(prompt="a punk", num_inference_steps=1, lora_weights=f"{base}/{name}?sig=secret")
    assert status == 200 and body["status"] == "failed", body
    error = body["error"]
    assert f"lora_weights: {base}/{name}" in error and what in error  # coglet puts "Prediction failed: ..." first
    assert guard_message(folder / name) in error and "secret" not in error
    assert "lora-url-cache" not in error and "<path>" not in error  # the URL named, never the server's file
    assert "rendered in a batch" not in body["logs"]


def test_lora_url_to_a_good_file_is_fused_and_cached(server: CogServer, lora_urls):
    base, _, requests = lora_urls
    inputs = {"prompt": "lad with a red beanie", "seed": 5, "num_inference_steps": 1}
    default = server.images(**inputs)
    downloads = lambda: [r for r in requests if r.startswith("/good.safetensors")]  # noqa: E731
    before = len(downloads())
    first = server.predict(**inputs, lora_weights=f"{base}/good.safetensors")
    second = server.predict(**inputs, lora_weights=f"{base}/good.safetensors")
    for status, body in (first, second):
        assert status == 200 and body["status"] == "succeeded", body.get("error") or body
        assert f"lora_weights: {base}/good.safetensors: SD1.5 LoRA" in body["logs"]
    assert len(downloads()) == before + 1  # the second prediction used the cached file
    assert server.files(first[1]) == server.files(second[1])
    assert server.files(first[1]) != default  # the URL's LoRA was fused
    assert server.images(**inputs) == default  # and the default one is back


def test_lora_and_lora_url_together_fail_naming_both(server: CogServer, lora_urls):
    base, _, _ = lora_urls
    status, body = server.predict(prompt="a punk", lora="other", lora_weights=f"{base}/good.safetensors")
    assert status == 200 and body["status"] == "failed"
    assert "lora_weights: give either lora (a served name) or lora_weights, not both" in body["error"]


def test_lora_url_is_refused_where_the_cache_is_off(cog_servers, lora_urls):
    server = cog_servers["no_schema"]  # PUNKS_LORA_URL_CACHE_SIZE unset: 0
    assert server.wait_until_settled()["status"] == "READY"
    status, body = server.predict(prompt="a punk", lora_weights=f"{lora_urls[0]}/good.safetensors")
    assert status == 200 and body["status"] == "failed"
    assert "lora_weights: not enabled on this deployment (PUNKS_LORA_URL_CACHE_SIZE is 0)" in body["error"]


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
            status, body = server.predict(prompt="a punk", num_inference_steps=1, lora_weights=url)
            assert status == 200 and body["status"] == "failed", body
            assert rule in body["error"] and str(internal.port) not in body["error"].replace(url, "")
        assert internal.hits == 0 and ftp.hits == 0


def test_an_image_url_is_fetched_under_the_download_policy(server: CogServer):
    """`image` as a URL goes where lora_weights may go, no further: loopback, link-local (a cloud's metadata
    service) and a redirect to loopback are refused naming `image`, the internal host untouched; a body or a data:
    URL over the input image cap is refused. No message repeats the URL's query (a signed URL's secret)."""
    cap = format_size(config.MAX_IMAGE_BYTES)
    loopback = f"image: {INTERNAL_HOST}: refused, not a public address (loopback)"
    with canary() as internal, hostile_server() as (base, _):
        cases = [
            (f"http://{INTERNAL_HOST}:{internal.port}/punk.png?signature=s3cret", loopback),
            (f"{base}/redirect?to=http://{INTERNAL_HOST}:{internal.port}/punk.png", loopback),
            (
                "http://169.254.169.254/latest/meta-data/punk.png",
                "image: 169.254.169.254: refused, not a public address (link-local)",
            ),
            (f"{base}/huge?signature=s3cret", f"image: {ALLOWED_HOST}: 800.0 MiB is over the {cap} cap; not fetched"),
            (f"{base}/huge-chunked", f"image: {ALLOWED_HOST}: larger than the {cap} cap; stopped"),  # no length
            (
                "data:image/png;base64," + "A" * (config.MAX_IMAGE_BYTES * 4 // 3 + 8),
                f"image: at most {config.MAX_IMAGE_BYTES} bytes, got more",
            ),
        ]
        for url, message in cases:
            status, body = server.predict(prompt="a punk", num_inference_steps=1, image=url)
            assert status == 200 and body["status"] == "failed", body
            assert message in body["error"] and "s3cret" not in body["error"], body["error"]
        assert internal.hits == 0


def test_a_cancelled_prediction_stops_its_image_download(server: CogServer):
    """An image URL sending a byte a second: cancelling the prediction ends the download (within the stall
    timeout), where it would otherwise go on until the policy's deadline."""
    with hostile_server(slow_every_s=1.0) as (base, stats), ThreadPoolExecutor(1) as pool:
        inputs = {"prompt": "a punk", "num_inference_steps": 1, "image": f"{base}/slow"}
        pending = pool.submit(server.request, "PUT", "/predictions/slow-image", {"input": inputs})
        deadline = time.monotonic() + 30
        while not stats.dribbling:
            assert time.monotonic() < deadline, "the image download never started"
            time.sleep(0.1)
        assert server.request("POST", "/predictions/slow-image/cancel")[0] == 200
        assert pending.result(timeout=60)[1]["status"] == "canceled"
        deadline = time.monotonic() + 15  # the stall timeout (5 s) bounds how long a cancelled download runs on
        while stats.dribbling:
            assert time.monotonic() < deadline, "the image download still runs after cancel"
            time.sleep(0.2)


def test_slow_lora_urls_hold_up_no_other_prediction_and_stop_when_cancelled(server: CogServer):
    """Six predictions whose lora_url sends a byte a second (under the stall timeout, no rate floor here): a plain
    prediction is still served at once, and cancelling them stops their downloads."""
    with hostile_server(slow_every_s=1.0) as (base, stats), ThreadPoolExecutor(6) as pool:
        slow = [
            pool.submit(
                server.request,
                "PUT",
                f"/predictions/slow-{i}",
                {"input": {"prompt": "a punk", "num_inference_steps": 1, "lora_weights": f"{base}/slow?{i}"}},
            )
            for i in range(6)
        ]
        deadline = time.monotonic() + 30
        while stats.dribbling < 4:  # the download threads are all busy; two more predictions wait for one
            assert time.monotonic() < deadline, "the slow downloads never started"
            time.sleep(0.1)
        started = time.monotonic()
        status, plain = server.predict(prompt="a punk", seed=3, num_inference_steps=1)
        assert status == 200 and plain["status"] == "succeeded", plain
        assert time.monotonic() - started < 30
        for i in range(6):
            assert server.request("POST", f"/predictions/slow-{i}/cancel")[0] == 200
        assert [future.result(timeout=60)[1]["status"] for future in slow] == ["canceled"] * 6
        deadline = time.monotonic() + 15  # the stall timeout (5 s) bounds how long a cancelled download runs on
        while stats.dribbling:
            assert time.monotonic() < deadline, f"{stats.dribbling} downloads still running after cancel"
            time.sleep(0.2)
    assert server.images(prompt="a punk", seed=3, num_inference_steps=1) == server.files(plain)


def test_a_lora_url_serves_only_the_requests_naming_it(server: CogServer, lora_urls):
    """Its cache name is no LoRA another caller can pick, nor listed in the unknown-LoRA error."""
    base, _, _ = lora_urls
    status, body = server.predict(
        prompt="a punk", seed=4, num_inference_steps=1, lora_weights=f"{base}/good.safetensors"
    )
    assert status == 200 and body["status"] == "succeeded", body
    cache_names = {path.stem for path in server.log.parent.glob("lora-url-cache/url-*.safetensors")}
    assert cache_names  # the file is cached under a name
    for name in cache_names:
        status, body = server.predict(prompt="a punk", seed=4, num_inference_steps=1, lora=name)
        assert status == 200 and body["status"] == "failed"
        assert "unknown LoRA" in body["error"] and "url-" not in body["error"].replace(name, "")


def test_cog_errors_name_no_server_path(server: CogServer):
    status, body = server.predict(prompt="a punk", num_inference_steps=1, lora="nope")
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
    status, body = server.predict(prompt="a punk", num_inference_steps=1, lora_weights=f"{base}/nan.safetensors")
    assert status == 200 and body["status"] == "failed"
    assert f"lora_weights: {base}/nan.safetensors: tensor {first_alpha} holds NaN or infinite values" in body["error"]


def test_lora_weights_in_the_forms_people_paste(server: CogServer, lora_urls):
    """A Hub file as hf://, owner/repo/file (the Hub's files come from the loopback server here, HF_ENDPOINT) and a
    Replicate training's .tar holding one .safetensors: the same LoRA, the same image as its plain URL."""
    base, folder, _ = lora_urls
    for revision in ("main", "v1"):
        hub = folder / f"owner/punks/resolve/{revision}"
        hub.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "good.safetensors", hub / "good.safetensors")
    with tarfile.open(folder / "trained_model.tar", "w") as tar:
        tar.add(folder / "good.safetensors", arcname="output/lora.safetensors")
        tar.add(folder / "b.bin", arcname="output/README.txt")
    inputs = {"prompt": "a punk", "seed": 6, "num_inference_steps": 1}
    reference = server.images(**inputs, lora_weights=f"{base}/good.safetensors")
    assert reference != server.images(**inputs)
    for pasted in ("owner/punks/good.safetensors", "hf://owner/punks@v1/good.safetensors", f"{base}/trained_model.tar"):
        status, body = server.predict(**inputs, lora_weights=pasted)
        assert status == 200, body
        assert server.files(body) == reference, pasted
        assert "SD1.5 LoRA" in body["logs"]
    assert not list(server.log.parent.glob("lora-url-cache/*.tar*"))  # the .tar itself is not kept


def test_a_tar_without_exactly_one_safetensors_fails_naming_it(server: CogServer, lora_urls):
    base, folder, _ = lora_urls
    with tarfile.open(folder / "two.tar", "w") as tar:
        tar.add(folder / "good.safetensors", arcname="a.safetensors")
        tar.add(folder / "good.safetensors", arcname="b.safetensors")
    (folder / "not-a.tar").write_bytes(b"plain bytes")
    for name, reason in (
        ("two.tar", "exactly one .safetensors file (found: a.safetensors, b.safetensors)"),
        ("not-a.tar", "not a readable .tar file"),
    ):
        status, body = server.predict(prompt="a punk", num_inference_steps=1, lora_weights=f"{base}/{name}")
        assert status == 200 and body["status"] == "failed", body
        assert f"lora_weights: {base}/{name}: " in body["error"] and reason in body["error"]


def test_a_private_hub_lora_needs_the_callers_token_which_only_it_uses(server: CogServer, lora_urls):
    base, folder, _ = lora_urls
    private = folder / "owner/private/resolve/main"
    private.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "good.safetensors", private / "good.safetensors")
    inputs = {"prompt": "a punk", "seed": 8, "num_inference_steps": 1, "lora_weights": "owner/private/good.safetensors"}
    status, refused = server.predict(**inputs)
    assert status == 200 and refused["status"] == "failed" and "HTTP 401" in refused["error"]
    with_token = server.images(**inputs, hf_api_token=HUB_TOKEN)
    assert with_token == server.images(**inputs | {"lora_weights": f"{base}/good.safetensors"})
    status, again = server.predict(**inputs)  # cached under the token: not for a request without it
    assert status == 200 and again["status"] == "failed" and "HTTP 401" in again["error"]
    assert HUB_TOKEN not in json.dumps(again) and HUB_TOKEN not in server.log_tail(1_000_000)
    sent = {auth for path, auth in _Handler.tokens if auth}
    assert sent == {f"Bearer {HUB_TOKEN}"}  # the server's own HF_TOKEN (unset here) never, the caller's own only
    assert all("/private/" in path for path, auth in _Handler.tokens if auth)


def torch_nan_like(tensor):
    import torch

    return torch.full_like(tensor, float("nan"))


# --- weights download (service/weights/fetch.py) against a local http.server --------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; a path under /private/ only with the token (as the Hub serves a private repo's files)."""

    requests: list[str] = []
    tokens: list[tuple[str, str | None]] = []  # (path, Authorization header) of every request, of every server

    def do_GET(self):
        type(self).requests.append(self.path)
        type(self).tokens.append((self.path, self.headers.get("Authorization")))
        if "/private/" in self.path and self.headers.get("Authorization") != f"Bearer {HUB_TOKEN}":
            self.send_error(401)
            return
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


def test_nothing_to_fetch_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PUNKS_WEIGHTS_URLS", raising=False)
    assert fetch_listed_weights(Settings().weights_urls, tmp_path / "w") == []
    monkeypatch.setenv("PUNKS_WEIGHTS_URLS", "  ")
    assert fetch_listed_weights(Settings().weights_urls, tmp_path / "w") == []
    assert not (tmp_path / "w").exists()
    monkeypatch.setenv("PUNKS_WEIGHTS_URLS", "loras/a.safetensors=https://host/a.safetensors")
    assert Settings().weights_urls == "loras/a.safetensors=https://host/a.safetensors"  # the variable Cog's setup reads


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
        "negative_prompt": "",
        "num_inference_steps": 1,
        "guidance_scale": 7.5,
        "scheduler": "DPM++ 2M",
        "lora": "",
        "lora_weights": "",
        "lora_scale": 1.0,
        "hf_api_token": None,
        "output_size": 1024,
        "integer_scale": False,
        "return_sprites": True,
        "output_format": "png",
        "palette": "",
        "background": "keep",
        "image": None,
        "strength": 0.6,
    }

    async def setup_then_run_twice():  # as coglet does: setup and every run on one event loop
        await runner.setup()
        first = await runner.run(**inputs)
        sizes = [Image.open(p).size for p in first]
        return first, sizes, await runner.run(**inputs | {"num_outputs": 1, "output_size": 48, "return_sprites": False})

    output, sizes, again = asyncio.run(setup_then_run_twice())
    assert not runner.engine.is_smoke  # loaded the downloaded files as real weights
    assert runner.engine.weights.base_model == tmp_path / "weights" / "stable-diffusion-v1-5"
    assert [Path(p).name for p in output] == [
        "out-0-seed5.png",
        "out-1-seed6.png",
        "out-0-seed5-sprite.png",
        "out-1-seed6-sprite.png",
    ]
    assert sizes == [(1024, 1024)] * 2 + [(GRID, GRID)] * 2
    assert [Path(p).name for p in again] == ["out-0-seed5.png"]
    # with KEPT_OUTPUT_FOLDERS 1, the next prediction removed this one's files (sent by then)
    assert not any(Path(p).exists() for p in output) and Image.open(again[0]).size == (48, 48)


def test_a_prediction_of_the_demo_model_says_so_in_its_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """Without weights (and the fallback allowed) the runner serves the demo model, and each prediction's log
    says so, as the CLI does."""
    import predict

    runner_env(monkeypatch, tmp_path / "weights", "")
    monkeypatch.setenv("PUNKS_ALLOW_SMOKE_MODEL", "true")
    monkeypatch.setenv("PUNKS_FALLBACK_MODEL", "demo")
    monkeypatch.setenv("PUNKS_WARMUP", "false")
    runner = predict.Runner()
    request = predict.GenerationRequest(prompt="a punk", seed=3, num_inference_steps=1)

    async def setup_then_run():
        await runner.setup()
        return await runner._run(request, "", None)

    output = asyncio.run(setup_then_run())
    assert runner.engine.weights.is_demo and not runner.engine.is_smoke
    assert [Path(p).name for p in output] == ["out-0-seed3.png"]
    assert "warning: made with the demo model" in capsys.readouterr().out


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


def test_setup_fetches_what_weights_lacks_from_the_pinned_source(
    http_files, smoke_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """cog.yaml's PUNKS_FETCH_AT_SETUP: SD1.5 from its pinned source (here a loopback mirror of the smoke model, its
    files pinned by their sha256 as the real ones are) and the LoRA from PUNKS_LORA_URL, before loading."""
    import predict
    from devtools.smoke import SMOKE_FOLDER, SMOKE_LORA
    from service.weights import pinned

    base, _, _ = http_files
    folder = smoke_dir / SMOKE_FOLDER
    monkeypatch.setattr(
        pinned, "SD15_SHA256", {p.relative_to(folder).as_posix(): sha256(p) for p in folder.rglob("*") if p.is_file()}
    )
    runner_env(monkeypatch, tmp_path / "weights", "")
    monkeypatch.setenv("PUNKS_FETCH_AT_SETUP", "true")
    monkeypatch.setenv("PUNKS_BASE_MODEL_MIRROR", f"{base}/smoke/{SMOKE_FOLDER}")
    monkeypatch.setenv("PUNKS_LORA_URL", f"{base}/smoke/{SMOKE_LORA}#sha256={sha256(smoke_dir / SMOKE_LORA)}")
    runner = predict.Runner()
    asyncio.run(runner.setup())
    assert not runner.engine.is_smoke  # the fetched files, loaded as real weights
    assert runner.engine.weights.base_model == tmp_path / "weights" / "stable-diffusion-v1-5"
    assert (tmp_path / "weights" / "bespoke_punks.safetensors").read_bytes() == (smoke_dir / SMOKE_LORA).read_bytes()
