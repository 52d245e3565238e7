"""Cog (the real coglet server, as Replicate runs predict.py) next to the FastAPI service, in one run.

    python -m bench.cog_bench --out bench/results/                      # on a CUDA machine, compiled
    python -m bench.cog_bench --smoke --steps 2 --rounds 1 --no-compile # a quick dry run on a CPU

Both servers run the same engine on the same weights (the full-size random SD1.5 + rank-32 LoRA that
bench/bench.py builds), compiled as in production (PUNKS_COMPILE=true, one inductor cache shared by both, so the
second server's compile reuses the first's). `clients` threads each send `rounds` one-image requests at once;
reported: images/s, per-request wall time (p50/p95, as the client sees it), cold start (process start -> ready),
and for Cog the batch sizes its predictions were rendered in. Cog runs in upload mode, as on Replicate: each
prediction's file (out-0-seed<s>.png) goes to a loopback file store (FileStore), which answers with its URL, so
the Cog numbers include the upload the HTTP service does not make (it returns base64 in its JSON). Both send
the same input names (num_inference_steps: Cog's schema default is 25 whatever PUNKS_STEPS says).
"""

import argparse
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.bench import PROMPT, environment, free_port, percentiles, prepare_weights  # bench/bench.py

REPO = Path(__file__).resolve().parents[1]


def call(url: str, body: dict | None = None, method: str = "POST", timeout: float = 900) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, log: Path, limit_s: float = 900) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if ready():
                return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {limit_s}s: {log.read_text()[-3000:]}")


def load(send: Callable[[int], dict], clients: int, rounds: int) -> dict:
    """`clients` threads, each sending `rounds` requests back to back; one request first, unmeasured."""
    send(10_000)
    latencies: list[float] = []
    answers: list[dict] = []

    def client(index: int) -> None:
        for round_ in range(rounds):
            started = time.perf_counter()
            answers.append(send(index * 100 + round_))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "images": len(latencies),
        "seconds": round(elapsed, 2),
        "images_per_s": round(len(latencies) / elapsed, 2),
        "request_s": percentiles(latencies),
        "answers": answers,
    }


class FileStore(http.server.ThreadingHTTPServer):
    """Replicate's file store on loopback: PUT <url><name> is counted and answered with a URL of its own."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Upload)
        self.uploads: list[str] = []  # the file names, in the order their uploads ended
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/upload/"


class _Upload(http.server.BaseHTTPRequestHandler):
    server: FileStore

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.uploads.append(self.path.rsplit("/", 1)[-1])
            location = f"http://127.0.0.1:{self.server.server_address[1]}/files/{len(self.server.uploads)}"
        self.send_response(201)
        self.send_header("Location", location)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def cog_input(seed: int, steps: int) -> dict:
    """One prediction's input, under the Cog model's names (the same names the HTTP service takes)."""
    return {"prompt": PROMPT, "seed": seed, "num_inference_steps": steps}


def is_one_uploaded_file(body: dict) -> bool:
    """A one-image prediction's output as Replicate stores it: one uploaded file's URL (no data URL)."""
    return len(body["output"]) == 1 and body["output"][0].startswith("http://")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def bench_cog(args: argparse.Namespace, env: dict[str, str]) -> dict:
    port = free_port()
    log = args.logs / "cog.log"
    store = FileStore()
    started = time.perf_counter()
    server = start(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", "--upload-url", store.url],
        env | {"PORT": str(port), "COG_PREDICT_TYPE_STUB": "predict.py:Runner"},
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: call(f"{url}/health-check", method="GET", timeout=5)["status"] == "READY", server, log)
        cold_start = time.perf_counter() - started

        def send(seed: int) -> dict:
            """One prediction; a 409 is retried as Replicate's client does: coglet frees a slot a moment after
            it answers, so a client that sends its next prediction at once can find all 8 slots still taken."""
            for retries in range(100):  # noqa: B007 - read after the loop: how many 409s it took
                try:
                    body = call(f"{url}/predictions", {"input": cog_input(seed, args.steps)})
                    break
                except urllib.error.HTTPError as error:
                    if error.code != 409:
                        raise
                    time.sleep(0.01)
            else:
                raise RuntimeError("prediction: still 409 (all slots taken) after 100 tries")
            if body["status"] != "succeeded" or not is_one_uploaded_file(body):
                raise RuntimeError(f"prediction {body['status']}: {body.get('error') or body.get('output')}")
            return {"batch_images": body["metrics"]["batch_images"], "retries": retries}

        result = load(send, args.clients, args.rounds)
    finally:
        server.terminate()
        server.wait(timeout=60)
        store.shutdown()
    answers = result.pop("answers")
    batches = [answer["batch_images"] for answer in answers]
    return result | {
        "cold_start_s": round(cold_start, 1),
        "mean_batch_images": round(sum(batches) / len(batches), 2),
        "retried_409": sum(answer["retries"] for answer in answers),
        "uploads": len(store.uploads),  # one file per image, the warm-up's included
        "uploads_named_by_index_and_seed": all(re.fullmatch(r"out-0-seed\d+\.png", n) for n in store.uploads),
    }


def bench_http(args: argparse.Namespace, env: dict[str, str]) -> dict:
    port = free_port()
    log = args.logs / "uvicorn.log"
    started = time.perf_counter()
    server = start(
        [sys.executable, "-m", "uvicorn", "service.http.app:app", "--host", "127.0.0.1", "--port", str(port)], env, log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{url}/readyz", timeout=5).status == 200, server, log)
        cold_start = time.perf_counter() - started
        result = load(lambda seed: call(f"{url}/v1/generate", cog_input(seed, args.steps)), args.clients, args.rounds)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result.pop("answers")
    return result | {"cold_start_s": round(cold_start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("/tmp/bench-weights"))
    parser.add_argument("--smoke", action="store_true", help="tiny random model (CPU dry run)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="requests per client")
    parser.add_argument("--surfaces", default="cog,http")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/cog-bench-logs"))
    parser.add_argument("--out", type=Path, help="folder for the results JSON")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    prepare_weights(args)
    env = os.environ | {
        "PUNKS_WEIGHTS_DIR": str(args.weights),
        "PUNKS_STEPS": str(args.steps),
        "PUNKS_COMPILE": str(args.compile).lower(),
        "COG_MAX_CONCURRENCY": "8",  # predict.py's @cog.concurrent(max=8)
        "TORCHINDUCTOR_CACHE_DIR": "/tmp/cog-bench-inductor",
        "PYTHONUNBUFFERED": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # coglet's worker
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    report = {
        "environment": environment(),
        "steps": args.steps,
        "compile": args.compile,
        "model": "smoke" if args.smoke else "full-size SD1.5, random weights, rank-32 LoRA",
        "results": {},
    }
    for surface in args.surfaces.split(","):
        try:
            report["results"][surface] = (bench_cog if surface == "cog" else bench_http)(args, env)
        except Exception as error:  # keep the other surface's numbers
            report["results"][surface] = {"error": f"{type(error).__name__}: {error}"[-3000:]}
        print(surface, json.dumps(report["results"][surface]), flush=True)
    text = json.dumps(report, indent=2) + "\n"
    print(text)
    if args.out:
        gpu = report["environment"]["gpu"].replace(" ", "-")
        path = args.out / f"{report['environment']['date']}-{gpu}-cog-vs-http.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
