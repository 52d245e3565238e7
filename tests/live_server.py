"""Real uvicorn servers on loopback for the API tests: in a thread (to inject an engine) or as a subprocess."""

import dataclasses
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psutil
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.engine import Engine, GenerationRequest, Rendered
from service.http import serve
from service.http.app import create_app

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = httpx.Timeout(180.0)
FAST = {"steps": 1, "generation_size": 256}  # the smoke model's images are noise at any size
READY_TIMEOUT_S = 120


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ThreadServer:
    """The service's uvicorn server and settings (service/http/serve.py) in a thread, on a socket bound up
    front (no free-port race). `server.should_exit = True` is what SIGTERM does."""

    def __init__(self, app: FastAPI):
        self.sock = _loopback_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = serve.Server(serve.config(app, app.state.settings, log_level="warning"), app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextmanager
def thread_server(app: FastAPI, ready: bool = True) -> Iterator[str]:
    server = ThreadServer(app).start()
    try:
        if ready:
            wait_ready(server.url)
        yield server.url
    finally:
        server.stop()


@contextmanager
def subprocess_server(env: dict[str, str]) -> Iterator[str]:
    """`python -m service serve`, exactly as deployed (the Dockerfile's CMD)."""
    with served_process(env) as (url, _):
        yield url


@contextmanager
def served_process(env: dict[str, str], log: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """The deployed server and its process (to signal it); its stdout and stderr go to `log` when given."""
    with _loopback_socket() as sock:
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with ExitStack() as files:
        output = files.enter_context(open(log, "wb")) if log else None
        process = subprocess.Popen(
            command, cwd=ROOT, env=env | {"PYTHONPATH": str(ROOT)}, stdout=output, stderr=output and subprocess.STDOUT
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}", process)
            yield f"http://127.0.0.1:{port}", process
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=60)


def wait_ready(url: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, f"server exited with {process.returncode}"
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {READY_TIMEOUT_S}s")


class SpyEngine:
    """The real engine, plus what tests need: counts engine calls, can hold them at a gate, fails
    (simulated CUDA OOM) on a prompt containing 'boom', and can cap steps/images to keep fuzzing fast."""

    def __init__(self, engine: Engine, cap: bool = False):
        self.engine = engine
        self.cap = cap
        self.calls: list[list[str]] = []  # the prompts of each render call
        self.finished = 0  # calls that returned or raised
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def render(self, requests: Sequence[GenerationRequest], progress=None) -> list[Rendered]:
        self.calls.append([request.prompt for request in requests])
        self.entered.set()
        try:
            assert self.gate.wait(timeout=60)
            if any("boom" in request.prompt for request in requests):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            if self.cap:
                requests = [dataclasses.replace(r, num_outputs=1, num_inference_steps=1) for r in requests]
            return self.engine.render(requests, progress)
        finally:
            self.finished += 1


def make_app(smoke_settings: Settings, engine_factory: Callable[[], object], **overrides) -> FastAPI:
    """The app with the FAST settings (and any others), loading the engine from `engine_factory`."""
    return create_app(Settings(**smoke_settings.model_dump() | FAST | overrides), engine_factory)


def post(url: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=TIMEOUT)


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_queued(url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while metric_samples(url)[("punks_queue_depth", ())] != count:
        assert time.monotonic() < deadline, f"queue never reached {count}"
        time.sleep(0.02)


def behind_blocker(url: str, spy: SpyEngine, bodies: list[dict]) -> list[httpx.Response]:
    """Hold the GPU with one request, queue `bodies` behind it, release: they form one batch."""
    spy.gate.clear()
    spy.entered.clear()
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        blocker = pool.submit(post, url, {"prompt": "blocker", "seed": 1})
        assert spy.entered.wait(30)
        futures = [pool.submit(post, url, body) for body in bodies]
        wait_queued(url, len(bodies))
        spy.gate.set()
        assert blocker.result().status_code == 200
        return [future.result() for future in futures]


def still_running(process: psutil.Process) -> bool:
    """Not exited (a zombie has: only its parent, maybe a container's PID 1, has not reaped it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
