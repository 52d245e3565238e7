"""Benchmark: plain diffusers (the baseline a user would write) vs this project's engine, in one run.

    python bench/bench.py --out bench/results/            # on a CUDA machine (the device tool's H100)
    python bench/bench.py --smoke --runs 2 --steps 2      # a quick dry run on a CPU with the smoke model

Builds the FULL-SIZE SD1.5 architecture with random weights plus a random rank-32 kohya LoRA, saves them
in weights/ layout, and loads them through each side's own loader, so cold start is measured honestly.
Each measurement runs in a fresh process: cold start is process start -> ready (weights read, LoRA
fused, warm-up done). Reports median and p95 of repeated runs, peak GPU memory, and throughput with 8
concurrent clients through the real FastAPI service on loopback.
"""

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPT = "lad with a red beanie, green background"
READY = "BENCH-READY"


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median": round(statistics.median(ordered), 4), "p95": round(p95, 4), "n": len(ordered)}


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- workers (each in its own process)


def worker_baseline(args: argparse.Namespace) -> dict:
    """Plain diffusers as a user would write it: fp16 pipeline, LoRA loaded and left unfused."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        args.weights / "stable-diffusion-v1-5", dtype=dtype, safety_checker=None
    )
    pipe.load_lora_weights(str(args.weights / "bespoke_punks.safetensors"))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def request(seed: int, images: int = 1) -> bytes:
        generator = torch.Generator(device).manual_seed(seed)
        out = pipe(PROMPT, num_inference_steps=args.steps, generator=generator, num_images_per_prompt=images)
        return png_bytes(out.images[0].resize((1024, 1024), Image.NEAREST))

    request(0)  # warm-up
    print(READY, flush=True)
    return measure(args, request, device)


def worker_engine(args: argparse.Namespace) -> dict:
    import logging

    import torch

    from service.config import Settings
    from service.engine import Engine, GenerationRequest

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # start-up stages, to stderr
    settings = Settings()
    engine = Engine.load(settings)
    print(READY, flush=True)

    def request(seed: int, images: int = 1) -> bytes:
        result = engine.generate(GenerationRequest(PROMPT, seed=seed, num_outputs=images, steps=args.steps))
        return png_bytes(result.images[0].art.image)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = measure(args, request, device)
    result["timings_last"] = engine.generate(GenerationRequest(PROMPT, seed=1, steps=args.steps)).timings
    result["render_by_batch"] = render_by_batch(engine, args, settings.batch_buckets)
    return result


def render_by_batch(engine, args: argparse.Namespace, sizes: tuple[int, ...], repeats: int = 3) -> dict:
    """The GPU half alone (engine.render: diffusion + VAE decode) per batch size: the throughput ceiling."""
    from service.config import MAX_IMAGES
    from service.engine import GenerationRequest

    report = {}
    for size in sizes:
        seconds = []
        for seed in range(repeats):
            requests = [
                GenerationRequest(
                    PROMPT, seed=seed * 100 + first, num_outputs=min(MAX_IMAGES, size - first), steps=args.steps
                )
                for first in range(0, size, MAX_IMAGES)
            ]
            started = time.perf_counter()
            engine.render(requests)
            seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds)
        report[str(size)] = {"render_s": round(median, 4), "images_per_s": round(size / median, 2)}
    return report


def measure(args: argparse.Namespace, request, device: str) -> dict:
    import torch

    latencies = []
    for seed in range(args.runs):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        data = request(seed)
        latencies.append(time.perf_counter() - started)
        assert data.startswith(b"\x89PNG")
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        request(123, images=4)
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return {"latency_s": percentiles(latencies), "peak_memory_gib_batch4": peak}


# ---------------------------------------------------------------- parent: processes, servers, report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker(kind: str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    """Start a worker process; cold start = spawn -> its READY line."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--weights",
        str(args.weights),
        "--runs",
        str(args.runs),
        "--steps",
        str(args.steps),
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    cold_start = None
    lines = []
    for line in process.stdout:
        if line.startswith(READY) and cold_start is None:
            cold_start = round(time.perf_counter() - started, 2)
        lines.append(line)
    if process.wait() != 0:
        raise RuntimeError(f"{kind} worker failed: {''.join(lines[-20:])}")
    return {"cold_start_s": cold_start} | json.loads(lines[-1])


def throughput(args: argparse.Namespace, env: dict[str, str], clients: int = 8) -> dict:
    """Images per second with `clients` concurrent requests through uvicorn + the FastAPI app."""
    import httpx

    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.http.app:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server died: {server.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        cold_start = time.perf_counter() - started
        body = {"prompt": PROMPT, "steps": args.steps}

        def client(index: int) -> int:
            with httpx.Client(timeout=600) as http:
                for round_ in range(args.rounds):
                    response = http.post(
                        f"{url}/v1/generate",
                        json=body | {"seed": index * 100 + round_},
                        headers={"Accept": "image/png"},
                    )
                    response.raise_for_status()
            return args.rounds

        client(0)  # one request first: nothing of the measurement pays for lazy set-up
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            images = sum(pool.map(client, range(clients)))
        elapsed = time.perf_counter() - started
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=60)
    batch = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("punks_batch_images_sum", "punks_batch_images_count"))
    }
    return {
        "clients": clients,
        "images": images,
        "seconds": round(elapsed, 2),
        "images_per_s": round(images / elapsed, 2),
        "server_cold_start_s": round(cold_start, 2),
        "engine_calls": batch.get("punks_batch_images_count"),
        "mean_images_per_call": round(batch["punks_batch_images_sum"] / batch["punks_batch_images_count"], 2)
        if batch.get("punks_batch_images_count")
        else None,
    }


def prepare_weights(args: argparse.Namespace) -> None:
    import torch

    from devtools.smoke import build_full_size_pipeline, build_smoke_pipeline, save_random_model

    if (args.weights / "bespoke_punks.safetensors").is_file():
        return
    pipe = build_smoke_pipeline() if args.smoke else build_full_size_pipeline()
    if torch.cuda.is_available():
        pipe.to(torch.float16)
    save_random_model(args.weights, pipe, single_file=False)


def environment() -> dict:
    import diffusers
    import torch
    import transformers

    info = {
        "date": date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = "none (cpu)"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["baseline", "engine"])
    parser.add_argument("--weights", type=Path, default=Path("/tmp/bench-weights"))
    parser.add_argument("--smoke", action="store_true", help="tiny random model (CPU dry run)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8, help="requests per client in the throughput test")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--variants",
        default="baseline,engine,engine-compile",
        help="comma list of baseline, engine, engine-compile, engine-compile-again",
    )
    parser.add_argument("--throughput", default="engine,engine-compile", help="variants also measured through the API")
    parser.add_argument("--out", type=Path, help="folder (or .json file) for the results")
    args = parser.parse_args()
    if args.worker:
        worker = worker_baseline if args.worker == "baseline" else worker_engine
        print(json.dumps(worker(args)), flush=True)
        return

    prepare_weights(args)
    base_env = os.environ | {
        "PUNKS_WEIGHTS_DIR": str(args.weights),
        "PUNKS_BASE_MODEL": str(args.weights / "stable-diffusion-v1-5"),
        "PUNKS_STEPS": str(args.steps),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    envs = {
        "baseline": base_env,
        "engine": base_env | {"PUNKS_COMPILE": "false"},
        "engine-compile": base_env | {"PUNKS_COMPILE": "true"},
        "engine-compile-again": base_env | {"PUNKS_COMPILE": "true"},  # second start: reuses the compile cache
    }
    report = {
        "environment": environment(),
        "steps": args.steps,
        "runs": args.runs,
        "model": "smoke" if args.smoke else "full-size SD1.5, random weights, rank-32 LoRA",
        "results": {},
    }
    path = None
    if args.out:
        name = f"{report['environment']['date']}-{report['environment']['gpu'].replace(' ', '-')}.json"
        path = args.out / name if args.out.suffix != ".json" else args.out
        path.parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        kind = "baseline" if variant == "baseline" else "engine"
        result = run_worker(kind, args, envs[variant])
        if variant in args.throughput.split(","):
            try:
                result["throughput"] = throughput(args, envs[variant])
            except Exception as error:  # keep the other numbers of this variant
                result["throughput"] = {"error": f"{type(error).__name__}: {error}"}
        report["results"][variant] = result
        print(variant, json.dumps(result), flush=True)
        if path:  # after every variant, so a run cut short still leaves its numbers
            path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
