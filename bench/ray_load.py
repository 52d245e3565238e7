"""Load generator for the Ray Serve application (service/http/ray_app.py): images/s and p50/p95 latency at
1, 2, ... replicas, through Serve's HTTP proxy on loopback. Bounded: a fixed number of requests per replica
count, a fixed number of concurrent clients, a timeout per request.

    python -m bench.ray_load --replicas 1,2 --requests 64 --concurrency 16 --out bench/results/   # N GPUs
    python -m bench.ray_load --smoke --replicas 1 --requests 6 --concurrency 2 --steps 2             # CPU dry run
    python -m bench.ray_load --random-weights /tmp/w --compare-uvicorn --out bench/results/           # Serve's cost

--compare-uvicorn also measures the single-process service (`python -m service serve`) in the same run, with the
same settings, requests and clients, before Ray starts: the difference at 1 replica is what Serve's proxy and
router cost. --random-weights DIR builds the full-size SD1.5 architecture with random weights and a random
rank-32 LoRA there (as bench/bench.py does) and serves them: speed does not depend on the weights' values.

Ray is started locally (no dashboard) with as many GPUs as torch sees; each replica count is a fresh
deployment with min = max = that many replicas, warmed by one request per replica before the clock starts.
The settings are the usual PUNKS_* variables (real weights in PUNKS_WEIGHTS_DIR); --smoke uses the tiny
random smoke model on the CPU.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from importlib.metadata import version
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = "lad with a red beanie, green background"
MAX_REQUESTS, MAX_CONCURRENCY, TIMEOUT_S = 2000, 128, 300.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one(url: str, seed: int, steps: int | None) -> tuple[int, float, str]:
    body: dict = {"prompt": PROMPT, "seed": seed}
    if steps is not None:
        body["steps"] = steps
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/generate", json=body, headers={"Accept": "image/png"}, timeout=TIMEOUT_S)
    return response.status_code, time.perf_counter() - started, response.headers.get("x-replica", "")


def measure(url: str, replicas: int, requests: int, concurrency: int, steps: int | None) -> dict:
    with ThreadPoolExecutor(max(concurrency, replicas)) as pool:
        list(pool.map(lambda seed: one(url, seed, steps), range(replicas)))  # warm each replica's first batch
        started = time.perf_counter()
        results = list(pool.map(lambda seed: one(url, seed, steps), range(requests)))
        wall = time.perf_counter() - started
    latencies = [latency for code, latency, _ in results if code == 200]
    codes = Counter(code for code, _, _ in results)
    return {
        "replicas": replicas,
        "requests": requests,
        "concurrency": concurrency,
        "status_codes": {str(code): count for code, count in sorted(codes.items())},
        "served_by": dict(Counter(replica for code, _, replica in results if code == 200)),
        "images_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
        "wall_s": round(wall, 2),
    }


def random_full_size_weights(folder: Path) -> Path:
    """The full-size SD1.5 architecture with random weights (fp16 on CUDA) and a rank-32 LoRA, in weights/ layout."""
    import torch

    from devtools.smoke import SMOKE_FOLDER, SMOKE_LORA, build_full_size_pipeline, save_random_model

    if not (folder / SMOKE_LORA).is_file():
        pipe = build_full_size_pipeline()
        if torch.cuda.is_available():
            pipe.to(torch.float16)
        save_random_model(folder, pipe, single_file=False)
    os.environ |= {"PUNKS_WEIGHTS_DIR": str(folder), "PUNKS_BASE_MODEL": str(folder / SMOKE_FOLDER)}
    return folder


def measure_uvicorn(requests: int, concurrency: int, steps: int | None) -> dict:
    """The same load on the single-process service (`python -m service serve`), same PUNKS_* settings."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    started = time.perf_counter()
    # the log goes to a file, not a pipe: nobody reads it while the load runs
    with tempfile.TemporaryFile("w+") as log, subprocess.Popen(command, cwd=REPO, env=env, stderr=log) as server:
        try:
            while server.poll() is None:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            else:
                log.seek(0)
                raise RuntimeError(f"the service exited: {log.read()[-3000:]}")
            row = {"server": "uvicorn (python -m service serve)", "ready_s": round(time.perf_counter() - started, 1)}
            return row | measure(url, 1, requests, concurrency, steps)
        finally:
            server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1", help="comma-separated replica counts, e.g. 1,2,4")
    parser.add_argument("--requests", type=int, default=32, help=f"per replica count (at most {MAX_REQUESTS})")
    parser.add_argument("--concurrency", type=int, default=8, help=f"concurrent clients (at most {MAX_CONCURRENCY})")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per request (default: settings)")
    parser.add_argument("--smoke", action="store_true", help="the random smoke model on the CPU (a dry run)")
    parser.add_argument("--random-weights", type=Path, help="build full-size random SD1.5 weights here and serve them")
    parser.add_argument("--compare-uvicorn", action="store_true", help="also the single-process service, same run")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    args = parser.parse_args()
    counts = [int(count) for count in args.replicas.split(",")]
    if not (0 < args.requests <= MAX_REQUESTS and 0 < args.concurrency <= MAX_CONCURRENCY and min(counts) >= 1):
        parser.error(f"requests 1..{MAX_REQUESTS}, concurrency 1..{MAX_CONCURRENCY}, replicas >= 1")

    if args.smoke:
        from devtools.smoke import save_smoke_model

        scratch = Path(tempfile.mkdtemp(prefix="ray-load-"))
        os.environ |= {
            "PUNKS_WEIGHTS_DIR": str(scratch / "no-weights"),
            "PUNKS_SMOKE_DIR": str(save_smoke_model(scratch / "smoke")),
            "PUNKS_DEVICE": "cpu",
            "PUNKS_ALLOW_SMOKE_MODEL": "true",
        }
    elif args.random_weights:
        random_full_size_weights(args.random_weights)
    rows = []
    if args.compare_uvicorn:  # first, so that no Ray process shares the machine with it
        row = measure_uvicorn(args.requests, args.concurrency, args.steps)
        print(json.dumps(row), flush=True)
        rows.append(row)
    import ray
    import torch
    from ray import serve

    from service.http.ray_app import build_app

    gpus = 0 if args.smoke else torch.cuda.device_count()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for count in counts:
            bounds = {"ray_min_replicas": str(count), "ray_max_replicas": str(count)}
            started = time.perf_counter()
            serve.run(build_app(bounds), name="punks", route_prefix="/")
            ready_s = round(time.perf_counter() - started, 1)
            row = {"server": "Ray Serve", "ready_s": ready_s} | measure(
                url, count, args.requests, args.concurrency, args.steps
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
            serve.delete("punks")
    finally:
        serve.shutdown()
        ray.shutdown()
    device = torch.cuda.get_device_name(0) if gpus else platform.processor() or "cpu"
    result = {
        "date": date.today().isoformat(),
        "device": device,
        "gpus": gpus,
        "smoke": args.smoke,
        "versions": {
            name: version(name) for name in ("torch", "diffusers", "transformers", "ray", "fastapi", "uvicorn")
        },
        "settings": {key: value for key, value in os.environ.items() if key.startswith("PUNKS_")},
        "command": " ".join(["python", "-m", "bench.ray_load", *sys.argv[1:]]),
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"{result['date']}-ray-load-{'smoke' if args.smoke else device.replace(' ', '-')}.json"
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
