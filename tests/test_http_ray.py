"""The Ray Serve application (service/http/ray_app.py) on loopback: Ray started locally with 2 CPUs, no
dashboard, Serve's HTTP proxy on 127.0.0.1, two replicas of the smoke model; both serve, the same bytes, 422s and
readiness as the single-process app, and Serve's 429 once its proxy queue is full. deploy/*.yaml parse and import."""

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import ray
import yaml
from fastapi.testclient import TestClient
from ray import serve

from service.config import Settings
from service.delivery import encode_images
from service.engine import Engine
from service.http.app import create_app
from service.http.schemas import GenerateRequest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "lad with a red beanie, green background"
# Two replicas (one CPU each) and tight bounds, so the back-pressure test needs only a handful of requests:
# 1 on each replica, 1 at the proxy.
RAY_ENV = {
    "PUNKS_RAY_MIN_REPLICAS": "2",
    "PUNKS_RAY_MAX_REPLICAS": "2",
    "PUNKS_RAY_MAX_ONGOING_REQUESTS": "1",
    "PUNKS_RAY_MAX_QUEUED_REQUESTS": "1",
    "PUNKS_WARMUP": "false",
    "PUNKS_SNAP_PROCESSES": "1",  # as on a GPU (default: 4); the processes must stop with the replicas
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(smoke_env: dict[str, str]) -> Iterator[str]:
    from service.http import ray_app

    punks_env = {key: value for key, value in smoke_env.items() if key.startswith("PUNKS_")} | RAY_ENV
    saved = {key: os.environ.get(key) for key in punks_env}
    os.environ.update(punks_env)  # build_app forwards the PUNKS_* variables to the replica's runtime_env
    port = _free_port()
    before = {child.pid for child in psutil.Process().children(recursive=True)}  # other fixtures' servers
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        configure_logging=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app.build_app(), name="punks", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
        left = [child for child in started if _alive(child)]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert not left, f"Ray processes left behind: {[child.name() for child in left]}"


def _alive(process: psutil.Process, wait_s: float = 10.0) -> bool:
    """Whether a process of Ray's is still running once ray.shutdown() returned (it may take a moment to exit)."""
    try:
        process.wait(wait_s)
    except psutil.TimeoutExpired:
        return True
    except psutil.NoSuchProcess:
        pass
    return False


def _generate(url: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=120)


def test_readyz_through_serve(ray_url: str) -> None:
    response = httpx.get(f"{ray_url}/readyz", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "smoke_model": True}
    assert response.headers["x-replica"]


def test_png_matches_the_engine(ray_url: str, engine: Engine) -> None:
    body = {"prompt": PROMPT, "seed": 7, "num_inference_steps": 2}
    response = _generate(ray_url, body, Accept="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "7"
    expected = engine.generate(GenerateRequest(**body).to_engine()).images[0]
    assert response.content == encode_images([expected], "png", False)[0].image  # what the single process sends
    assert expected.art.image.size == (1024, 1024)


def test_both_replicas_serve_and_a_seed_reproduces_on_either(ray_url: str) -> None:
    body = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 1}

    def until_answered(_: int) -> httpx.Response:
        """As a client told Retry-After would: the proxy queue holds 1 here, and the router may pick the busy one."""
        for _attempt in range(50):
            response = _generate(ray_url, body, Accept="image/png")
            if response.status_code != 429:
                return response
            time.sleep(0.2)
        return response

    responses = []
    for _ in range(4):  # two at a time: each replica holds one request
        with ThreadPoolExecutor(2) as pool:
            responses += list(pool.map(until_answered, range(2)))
    assert [response.status_code for response in responses] == [200] * 8
    assert len({response.headers["x-replica"] for response in responses}) == 2
    assert len({response.content for response in responses}) == 1  # same seed, same bytes on either replica


def test_bad_body_same_422_as_single_process(ray_url: str, smoke_settings: Settings) -> None:
    bad = {"prompt": PROMPT, "num_inference_steps": 0, "num_outputs": 9}
    single = TestClient(create_app(smoke_settings)).post("/v1/generate", json=bad)  # no lifespan: validation only
    through_serve = _generate(ray_url, bad)
    assert through_serve.status_code == single.status_code == 422
    assert through_serve.json() == single.json()


def test_backpressure_429(ray_url: str) -> None:
    """1 request on the replica, 1 waiting at the proxy; the rest get Serve's 429 with Retry-After, at once."""
    body = {"prompt": PROMPT, "seed": 1, "num_inference_steps": 8}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _generate(ray_url, body, Accept="image/png"), range(6)))
    codes = sorted(response.status_code for response in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}, codes
    rejected = next(response for response in responses if response.status_code == 429)
    assert rejected.headers["retry-after"] == "5"
    answered = {response.content for response in responses if response.status_code == 200}
    assert len(answered) == 1  # same seed, same bytes whichever way it was batched


def test_deploy_files_parse_and_import() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` check
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    imported = __import__(module, fromlist=[name])
    assert isinstance(getattr(imported, name), serve.Application)
    rayservice = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    assert rayservice["kind"] == "RayService"
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    applications = serve_config["applications"]
    assert applications[0]["import_path"] == application["import_path"]
    env = {
        item["name"]: item.get("value")
        for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for container in group["template"]["spec"]["containers"]
        for item in container.get("env", [])
    }
    assert env["PUNKS_ALLOW_SMOKE_MODEL"] == "false"
