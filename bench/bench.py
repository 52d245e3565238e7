"""Benchmark: plain diffusers written two ways (a beginner's script and its docs' expert recipe) vs this
project's engine, eager and compiled, in one run.

    python -m bench.bench --out bench/results/              # on a CUDA machine (an H200 for the published numbers)
    python -m bench.bench --smoke --runs 2 --steps 2        # a quick dry run on a CPU with the smoke model

Builds the FULL-SIZE SD1.5 architecture with random weights plus a random rank-32 kohya LoRA, saves them
in weights/ layout, and loads them through each side's own loader, so cold start is measured honestly.
Each variant runs in a fresh process: cold start is process start -> ready (weights read, LoRA fused,
warm-up or compile done). Every variant gets the same prompt, steps and batch sizes, and each request is
prompt in, 1024 px PNG bytes out:

- naive: fp16 pipeline, LoRA loaded and left unfused, eager (what a first script looks like);
- expert: diffusers as its docs recommend: load_lora_weights + fuse_lora + unload_lora_weights,
  channels_last, torch.compile(mode="reduce-overhead", fullgraph=True) of the UNet and of vae.decode;
  no server, so its "8 clients" figure is its batch-4 rate with the PNGs (perfect batching, for free);
- engine / engine-compile: this service, PUNKS_COMPILE false / true; the compiled one also serves 8
  concurrent clients through the real FastAPI app (uvicorn in the worker, clients in this process), says
  where a batch-1 request's time goes, and measures the levers of issue 17 one by one;
- engine-compile-artifacts: a Replicate cold boot: a new process with brand-new empty compile caches and the
  portable compile-artifacts file that engine-compile saved from its cold compile (what `python -m service
  compile-cache` makes), measured to ready and through its first request;
- engine-compile-fp8: the opt-in mode PUNKS_FP8=true, compiled (its drift from fp16 is bench/fp8.py's job);
- levers of issue 17 that need their own process, measured like engine-compile: engine-compile-batch8 (batch
  buckets up to 8, so 8 clients share one UNet call); engine-compile-inductor-tuned (the Inductor flags of
  diffusers' speed-up guide: conv_1x1_as_mm, coordinate_descent_tuning, no epilogue_fusion);
  engine-compile-snap-processes (PUNKS_SNAP_PROCESSES=4: a batch's images are snapped in four worker processes,
  so the snapping's Python work no longer holds the GIL the GPU thread needs between graph replays; the default
  on CUDA since); engine-compile-snap-threads (PUNKS_SNAP_PROCESSES=0: snapping on the server's threads).

A run can go on in a later process with --resume (the earlier report): the versions and GPU model must match,
and each part is listed in the report with its GPU's UUID.

With random weights the diffusers columns' images are noise, whose 1024 px RGB PNG costs ~0.25 s per image on the
H200 machine, while the engine encodes a snapped, indexed image (~4 ms): compare render_s across columns; with_png_s
and the end-to-end latency favour the engine beyond what a real model's smooth images would.

The workers print their numbers as they get them, and the report is rewritten after each, so a run cut
short still leaves what it measured. The compile cache is shared by the expert and the engine (same
UNet and VAE graphs): the variant compiled first pays the empty-cache compile.
"""

import argparse
import gc
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "lad with a red beanie, green background"
READY = "BENCH-READY"
PART = "BENCH-PART "  # + one JSON object: numbers a worker has so far
SERVE = "BENCH-SERVE "  # + port and label: the worker's API is ready for the parent's clients
BATCH_SIZES = (1, 2, 4)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "median": round(statistics.median(ordered), 4),
        "p95": round(p95, 4),
        "max": round(ordered[-1], 4),
        "n": len(ordered),
    }


def png_bytes(image) -> bytes:
    """The service's own PNG encoding (service/delivery.py), for every column alike."""
    from service.delivery import encode

    return encode(image, "png")


def report_part(variant: str | None = None, **numbers) -> None:
    """Numbers of this worker's variant, or (variant) of another one measured in this process."""
    print(PART + json.dumps(numbers | ({"__variant__": variant} if variant else {})), flush=True)


def timed(call, repeats: int, sync) -> float:
    """Median seconds of `call()` (device synchronised before and after)."""
    seconds = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        call()
        sync()
        seconds.append(time.perf_counter() - started)
    return round(statistics.median(seconds), 5)


# ---------------------------------------------------------------- workers (each in its own process)


def diffusers_pipeline(args: argparse.Namespace, fused: bool):
    """The pipeline a user builds with diffusers alone: unfused (naive) or the docs' recipe (expert)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        args.weights / "stable-diffusion-v1-5", dtype=dtype, safety_checker=None
    )
    # The engine's sampler (DPM++ 2M): the same UNet calls per image (SD1.5's default PNDM makes 26 for 25 steps)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(args.weights / "bespoke_punks.safetensors"))
    if fused:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if fused and device == "cuda":  # the engine compiles on CUDA only, too
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)
    return pipe, device


def worker_diffusers(args: argparse.Namespace, fused: bool, in_process: str | None = None) -> dict:
    """naive (fused=False) or expert (fused=True): prompt in, 1024 px PNG out, like the engine's requests.

    in_process: the variant's name when it runs inside the engine's worker (on its GPU thread, after the
    engine's numbers: its compile then reuses the engine's caches, and cold start and peak memory are not its own)."""
    import torch
    from PIL import Image

    started = time.perf_counter()
    png_bytes(Image.new("P", (8, 8)))  # imports the service's encoder (service.delivery) before anything is timed
    pipe, device = diffusers_pipeline(args, fused)

    def images(seed: int, count: int) -> list:
        generator = torch.Generator(device).manual_seed(seed)
        return pipe(
            PROMPT,
            num_inference_steps=args.steps,
            generator=generator,
            num_images_per_prompt=count,
            height=512,  # SD1.5's default, said explicitly: the same work as the engine's, on the smoke model too
            width=512,
        ).images

    def request(seed: int, count: int = 1) -> list[bytes]:
        return [png_bytes(image.resize((1024, 1024), Image.NEAREST)) for image in images(seed, count)]

    def emit(**numbers) -> None:
        report_part(in_process, **numbers)

    for size in BATCH_SIZES if fused else (1,):  # warm-up (expert: record each batch size's graphs, as the engine)
        images(0, size)
    result: dict = {}
    if in_process:
        result["in_engine_process"] = True
        result["setup_s"] = round(time.perf_counter() - started, 2)  # load, fuse, compile with warm caches, warm-up
        emit(**result)
    else:
        print(READY, flush=True)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    runs = args.runs if fused else args.slow_runs
    result["latency_s"] = latency(lambda seed: request(seed), runs, sync)
    emit(**result)
    by_batch = {}
    repeats = args.batch_repeats if fused else 1  # eager naive: seconds per call, little spread
    for size in BATCH_SIZES:
        render_s = timed(lambda size=size: images(7, size), repeats, sync)
        with_png_s = timed(lambda size=size: request(7, size), repeats, sync)
        by_batch[str(size)] = {
            "render_s": render_s,
            "images_per_s": round(size / render_s, 2),
            "with_png_s": with_png_s,
            "images_per_s_with_png": round(size / with_png_s, 2),
        }
        emit(render_by_batch=by_batch)
    result["render_by_batch"] = by_batch
    if not in_process:  # the engine's allocations would count too
        result["peak_memory_gib_batch4"] = peak_memory(lambda: request(123, 4), device)
    return result


def latency(request, runs: int, sync) -> dict:
    seconds = []
    for seed in range(runs):
        sync()
        started = time.perf_counter()
        data = request(seed)
        seconds.append(time.perf_counter() - started)
        assert data[0].startswith(b"\x89PNG")
    return percentiles(seconds)


def peak_memory(call, device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    torch.cuda.reset_peak_memory_stats()
    call()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def worker_engine(args: argparse.Namespace) -> dict:
    """The engine behind the real FastAPI app, served by uvicorn on a thread of this process; the direct
    measurements run on the app's GPU thread (CUDA graphs replay only on the thread that recorded them)."""
    import logging

    import torch
    import uvicorn

    from service.config import Settings
    from service.engine import Engine, GenerationRequest
    from service.http.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # start-up stages, to stderr
    if os.environ.get(INDUCTOR_TUNED):  # the lever engine-compile-inductor-tuned, before anything compiles
        torch._inductor.config.conv_1x1_as_mm = True
        torch._inductor.config.coordinate_descent_tuning = True
        torch._inductor.config.coordinate_descent_check_all_directions = True
        torch._inductor.config.epilogue_fusion = False
    settings = Settings()
    calls: list[tuple[float, float, int]] = []  # (start, end, images) of every engine.render call

    def load() -> Engine:
        engine = Engine.load(settings)
        render = engine.render

        def render_timed(requests, progress=None):
            started = time.perf_counter()
            try:
                return render(requests, progress)
            finally:
                calls.append((started, time.perf_counter(), sum(r.num_outputs for r in requests)))

        engine.render = render_timed  # type: ignore[method-assign]  # before the batcher takes it
        return engine

    app = create_app(settings, load)
    service = app.state.service
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while service.unavailable() is not None:
        if service.load_error:
            raise RuntimeError(f"engine failed to load: {service.load_error}")
        time.sleep(0.05)
    print(READY, flush=True)
    engine = service.engine
    device = engine.device.type
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    if args.save_artifacts and settings.compile and device == "cuda":  # before the expert compiles in this process
        from service.acceleration import save_compile_artifacts

        report_part(compile_artifacts_mb=round(save_compile_artifacts(args.save_artifacts) / 1e6, 1))

    def on_gpu(call, *args):
        return service.gpu_thread.submit(call, *args).result()

    parts: list[dict[str, float]] = []  # per request: where its time went (the latency's split)

    def request(seed: int, count: int = 1, prompt: str = PROMPT) -> list[bytes]:
        result = engine.generate(GenerationRequest(prompt, seed=seed, num_outputs=count, steps=args.steps))
        started = time.perf_counter()
        encoded = [png_bytes(image.art.image) for image in result.images]
        parts.append(result.timings | {"png_s": time.perf_counter() - started})
        return encoded

    result: dict = {}
    if args.ready_only:  # a cold start: one request shows that nothing is left to compile
        first = time.perf_counter()
        on_gpu(request, 0)
        server.should_exit = True
        return {"first_request_s": round(time.perf_counter() - first, 3)}
    result["latency_s"] = on_gpu(latency, request, args.runs if settings.compile else args.slow_runs, sync)
    result["latency_parts_ms"] = {  # medians of each part over the same requests (they need not add up exactly)
        name.removesuffix("_s"): round(1000 * statistics.median(p[name] for p in parts), 2)
        for name in parts[0]
        if all(name in p for p in parts)
    }
    report_part(latency_s=result["latency_s"], latency_parts_ms=result["latency_parts_ms"])
    if settings.compile:  # the same requests through the API: one client, one request at a time
        result["http_latency"] = serve_clients(port, "one_client", calls, args, clients=1)
        report_part(http_latency=result["http_latency"])
    sizes = sorted(set(BATCH_SIZES) | set(settings.batch_buckets if settings.compile else ()))
    result["render_by_batch"] = on_gpu(render_by_batch, engine, sizes, args, sync)
    report_part(render_by_batch=result["render_by_batch"])
    result["peak_memory_gib_batch4"] = on_gpu(peak_memory, lambda: request(123, 4), device)
    report_part(peak_memory_gib_batch4=result["peak_memory_gib_batch4"])
    result["throughput"] = serve_clients(port, "default", calls, args)
    report_part(throughput=result["throughput"])
    in_process = [variant for variant in args.in_process.split(",") if variant]

    def measure_in_process(variant: str) -> None:
        report_part(variant, **attempt(lambda: on_gpu(worker_diffusers, args, variant == "expert", variant)))

    if "expert" in in_process:  # the comparison that matters most: before the levers
        measure_in_process("expert")
    # scheduler, snapping and PNG run eagerly in both modes; compiled, the text encoder replays CUDA graphs
    result["where_batch1_goes"] = attempt(lambda: on_gpu(batch1_breakdown, engine, args, sync))
    report_part(where_batch1_goes=result["where_batch1_goes"])
    for variant in in_process:
        if variant != "expert":
            measure_in_process(variant)
    if not (settings.compile and args.levers):
        return result
    levers: dict = {}
    result["levers"] = levers
    # Lever: a frozen heap (gc.freeze after warm-up): full collections no longer walk the compiler's objects.
    gc.collect()
    frozen = gc.get_freeze_count()
    gc.freeze()
    levers["gc_freeze"] = {
        "objects_frozen": gc.get_freeze_count() - frozen,
        "latency_s": attempt(lambda: on_gpu(latency, request, args.runs, sync)),
    }
    report_part(levers=levers)
    if "gc_freeze_clients" in args.levers:
        levers["gc_freeze"]["throughput"] = serve_clients(port, "gc_freeze", calls, args)
        report_part(levers=levers)
    if "switch_interval" in args.levers:
        # Lever: the GPU thread waits less for the GIL while other threads snap and encode (default 5 ms).
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        levers["switch_interval_0.5ms"] = {"throughput": serve_clients(port, "switch_interval", calls, args)}
        sys.setswitchinterval(switch_interval)
        report_part(levers=levers)
    server.should_exit = True
    return result


def attempt(measure) -> dict:
    """A measurement that may fail on its own (a lever) without losing the worker's other numbers."""
    try:
        return measure()
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"[-2000:]}


def serve_clients(port: int, label: str, calls: list, args: argparse.Namespace, clients: int = 8) -> dict:
    """Let the parent's clients load the API, then say how busy the GPU thread was meanwhile."""
    first = len(calls)
    print(f"{SERVE}{port} {label} {clients}", flush=True)
    reply = json.loads(sys.stdin.readline())  # the parent's client numbers, when its clients are done
    window = calls[first + 1 :]  # the parent's one unmeasured request first
    if not window:
        return reply
    span = window[-1][1] - window[0][0]
    gaps = [later[0] - earlier[1] for earlier, later in zip(window, window[1:], strict=False)]
    largest = max(images for *_, images in window)
    full = [end - start for start, end, images in window if images == largest]
    return reply | {
        "gpu_thread_busy": round(sum(end - start for start, end, _ in window) / span, 3),
        "engine_calls": len(window),
        "mean_images_per_call": round(sum(images for *_, images in window) / len(window), 2),
        "gap_between_calls_ms": round(1000 * statistics.median(gaps), 2) if gaps else None,
        f"render_{largest}_images_s_under_load": round(statistics.median(full), 4),
    }


def render_by_batch(engine, sizes: list[int], args: argparse.Namespace, sync) -> dict:
    """The GPU half alone (engine.render: diffusion + VAE decode) per batch size: the throughput ceiling."""
    from service.engine import GenerationRequest, request_sizes

    report = {}
    for size in sizes:
        requests = [GenerationRequest(PROMPT, seed=5, num_outputs=n, steps=args.steps) for n in request_sizes(size)]
        seconds = timed(lambda requests=requests: engine.render(requests), args.batch_repeats, sync)
        report[str(size)] = {"render_s": seconds, "images_per_s": round(size / seconds, 2)}
    return report


def batch1_breakdown(engine, args: argparse.Namespace, sync) -> dict:
    """Where one image's time goes, by CUDA events at each denoising step of a real render plus the parts
    timed alone: text encoder, scheduler steps, snapping, PNG encoding."""

    from service.engine import GenerationRequest

    cuda = engine.device.type == "cuda"
    request = GenerationRequest(PROMPT, seed=11, steps=args.steps)
    tokens = engine.check_request(request)
    report: dict = {
        "tokenize_and_check_ms": round(1000 * timed(lambda: engine.check_request(request), 20, lambda: None), 3),
        "text_encoder_ms": round(
            1000 * timed(lambda: engine._encode([tokens.token_ids], tokens.chunk_count), 20, sync), 3
        ),
    }
    samples: list[dict] = []
    for _ in range(args.batch_repeats):
        at, cpu, rendered = step_timeline(engine, request, cuda, sync)
        steps = [later - earlier for earlier, later in zip(at[1:-2], at[2:-1], strict=True)]
        samples.append(
            {
                "render_s": at[-1],
                "until_first_step_end_s": at[1],
                "step_ms_median": 1000 * statistics.median(steps),
                "after_last_step_s": at[-1] - at[-2],  # VAE decode, copy to the CPU, to PIL
                "cpu_ahead_of_gpu_at_last_step_ms": 1000 * (at[-2] - cpu[-2]),
            }
        )
    report |= {name: round(statistics.median(s[name] for s in samples), 4) for name in samples[0]}
    report["scheduler_step_ms"] = round(1000 * scheduler_step_s(engine, args.steps, sync), 3)
    report["finish_snap_ms"] = round(1000 * timed(lambda: engine.finish(rendered[0]), 10, lambda: None), 2)
    art = engine.finish(rendered[0]).images[0].art.image
    report["png_encode_ms"] = round(1000 * timed(lambda: png_bytes(art), 10, lambda: None), 2)
    return report


def step_timeline(engine, request, cuda: bool, sync) -> tuple[list[float], list[float], list]:
    """Seconds from the start of a render to each step's end and to its return: on the GPU (CUDA events in
    stream order) and on the CPU (when the step's callback ran); the last entry is the render's return."""
    import torch

    events, cpu = [], []

    def mark(done: int = 0, total: int = 0) -> None:
        cpu.append(time.perf_counter())
        if cuda:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()

    sync()
    mark()
    rendered = engine.render([request], mark)
    mark()
    sync()
    on_cpu = [t - cpu[0] for t in cpu]
    on_gpu = [events[0].elapsed_time(event) / 1000 for event in events] if cuda else on_cpu
    return on_gpu, on_cpu, rendered


def scheduler_step_s(engine, steps: int, sync) -> float:
    """One scheduler step on a batch-1 latent, eager as in the pipeline (device synchronised per run of steps)."""
    import torch

    pipe = engine.pipe
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    size = engine.settings.generation_size // pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, size, size)
    dtype = pipe.unet.dtype

    def run() -> None:
        scheduler.set_timesteps(steps, device=engine.device)
        latents = torch.randn(shape, device=engine.device, dtype=dtype)
        noise = torch.randn(shape, device=engine.device, dtype=dtype)
        for t in scheduler.timesteps:
            latents = scheduler.step(noise, t, latents).prev_sample

    return timed(run, 5, sync) / steps


# ---------------------------------------------------------------- parent: processes, clients, report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker(kind: str, extra: list[str], args: argparse.Namespace, env: dict[str, str], save, save_other) -> dict:
    """Start a worker process; cold start = spawn -> its READY line. Its partial numbers go into the
    report as they come (save), and it asks for the 8 clients through the API with a SERVE line."""
    command = [sys.executable, "-m", "bench.bench", "--worker", kind, "--weights", str(args.weights)]
    for option in ("runs", "slow_runs", "batch_repeats", "steps"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += extra
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, bufsize=1
    )
    result: dict = {}
    lines = []
    assert process.stdout is not None and process.stdin is not None
    for line in process.stdout:
        if line.startswith(READY) and "cold_start_s" not in result:
            result["cold_start_s"] = round(time.perf_counter() - started, 2)
        elif line.startswith(PART):
            numbers = json.loads(line[len(PART) :])
            if other := numbers.pop("__variant__", None):
                save_other(other, numbers)
                continue
            result |= numbers
        elif line.startswith(SERVE):
            port, label, count = line[len(SERVE) :].split()
            try:  # one client: as many requests as the in-process latency, one at a time
                clients = load_clients(int(port), args, int(count), args.runs if count == "1" else args.rounds)
            except Exception as error:  # keep the worker's other numbers
                clients = {"error": f"{type(error).__name__}: {error}"[-2000:]}
            print(f"  clients ({label}):", json.dumps(clients), flush=True)
            process.stdin.write(json.dumps(clients) + "\n")
            process.stdin.flush()
            continue
        else:
            lines.append(line)
            continue
        save(result)
    if code := process.wait():
        raise RuntimeError(f"{kind} worker failed (exit code {code}): {''.join(lines[-20:])}")
    return result | json.loads(lines[-1])


def load_clients(port: int, args: argparse.Namespace, clients: int, rounds: int) -> dict:
    """`clients` threads, each sending `rounds` one-image requests back to back (PNG back), after one unmeasured."""
    url = f"http://127.0.0.1:{port}/v1/generate"

    def send(seed: int) -> float:
        body = json.dumps({"prompt": PROMPT, "steps": args.steps, "seed": seed}).encode()
        headers = {"Content-Type": "application/json", "Accept": "image/png"}
        started = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=600) as response:
            assert response.read().startswith(b"\x89PNG")
        return time.perf_counter() - started

    send(10_000)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        seconds = list(pool.map(send, [c * 100 + r for c in range(clients) for r in range(rounds)]))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "images": len(seconds),
        "seconds": round(elapsed, 2),
        "images_per_s": round(len(seconds) / elapsed, 2),
        "request_s": percentiles(seconds),
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


def results_path(out: Path | None, environment: dict, kind: str = "") -> Path | None:
    """Where a bench script writes its JSON: `out` itself when it names a .json file, else DATE[-KIND]-GPU.json in
    the folder `out` (made when missing); None without `out`."""
    if out is None:
        return None
    gpu = environment["gpu"].replace(" ", "-")
    path = out if out.suffix == ".json" else out / "-".join(filter(None, [environment["date"], kind, gpu + ".json"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict:
    import diffusers
    import torch
    import transformers

    info = {
        "date": datetime.now(UTC).date().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        **{name: installed_version(name) for name in ("peft", "fastapi", "uvicorn")},
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


def installed_version(name: str) -> str | None:
    """A package's version, None where a bench that does not use it runs without it."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def gpu_identity() -> dict:
    """Which physical GPU a part ran on (a resumed run says whether its parts shared one)."""
    query = ["nvidia-smi", "--query-gpu=uuid,driver_version", "--format=csv,noheader"]
    try:
        uuid, driver = subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip().split(", ")
        return {"gpu_uuid": uuid, "driver": driver}
    except (OSError, subprocess.CalledProcessError, ValueError):
        return {}


def resumed(earlier: dict, fresh: dict) -> dict:
    """The earlier report, to be continued: refused when versions, GPU model or settings differ."""
    same = ("python", "torch", "diffusers", "transformers", "peft", "gpu", "cuda")  # each part says its driver
    differ = {
        key: (earlier["environment"].get(key), fresh["environment"].get(key))
        for key in same
        if earlier["environment"].get(key) != fresh["environment"].get(key)
    }
    for key in ("steps", "runs", "model"):
        if earlier.get(key) != fresh[key]:
            differ[key] = (earlier.get(key), fresh[key])
    if differ:
        raise SystemExit(f"--resume: this run differs from the earlier one: {differ}")
    if fresh["note"]:
        earlier["note"] = " ".join(filter(None, [earlier.get("note"), fresh["note"]]))
    return earlier


INDUCTOR_TUNED = "BENCH_INDUCTOR_TUNED"  # set: the engine worker sets diffusers' guide's Inductor flags
VARIANTS = {  # name -> (worker, environment beyond the common one)
    "naive": ("naive", {}),
    "expert": ("expert", {}),
    "engine": ("engine", {"PUNKS_COMPILE": "false"}),
    "engine-compile": ("engine", {"PUNKS_COMPILE": "true"}),
    "engine-compile-artifacts": ("engine", {"PUNKS_COMPILE": "true"}),
    "engine-compile-fp8": ("engine", {"PUNKS_COMPILE": "true", "PUNKS_FP8": "true"}),
    "engine-compile-fp8-bucket4": (  # one compiled shape: the FP8 compile of three did not end within 580 s
        "engine",
        {"PUNKS_COMPILE": "true", "PUNKS_FP8": "true", "PUNKS_BATCH_BUCKETS": "[4]"},
    ),
    "engine-compile-batch8": (
        "engine",
        {"PUNKS_COMPILE": "true", "PUNKS_BATCH_BUCKETS": "[1, 2, 4, 8]", "PUNKS_MAX_BATCH_SIZE": "8"},
    ),
    "engine-compile-inductor-tuned": ("engine", {"PUNKS_COMPILE": "true", INDUCTOR_TUNED: "1"}),
    "engine-compile-snap-processes": ("engine", {"PUNKS_COMPILE": "true", "PUNKS_SNAP_PROCESSES": "4"}),
    "engine-compile-snap-threads": ("engine", {"PUNKS_COMPILE": "true", "PUNKS_SNAP_PROCESSES": "0"}),
}
ARTIFACTS = "compile-artifacts.bin"  # engine-compile writes it; engine-compile-artifacts starts from it


def variant_setup(variant: str, args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """A variant's environment and worker options beyond the common ones.

    engine-compile saves the compile artifacts of its cold compile (what `python -m service compile-cache` makes)
    and alone runs the in-process diffusers variants and the levers that share its process;
    engine-compile-artifacts is a Replicate cold boot: a new process, brand-new empty cache folders, that file."""
    artifacts = args.weights / ARTIFACTS
    if variant == "engine-compile":
        return {}, ["--save-artifacts", str(artifacts), f"--in-process={args.in_process}", f"--levers={args.levers}"]
    if variant == "engine-compile-artifacts":
        if not artifacts.is_file():
            raise RuntimeError(f"no {artifacts}: run engine-compile first in this run")
        empty = Path(tempfile.mkdtemp(prefix="bench-empty-cache-"))
        env = {
            "PUNKS_COMPILE_ARTIFACTS": str(artifacts),
            "TORCHINDUCTOR_CACHE_DIR": str(empty),
            "TRITON_CACHE_DIR": str(empty / "triton"),
        }
        return env, ["--ready-only"]
    return {}, ["--in-process=", "--levers="]  # the worker's defaults are the parent's: say none


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["naive", "expert", "engine"])
    parser.add_argument("--weights", type=Path, default=Path("/tmp/bench-weights"))
    parser.add_argument("--smoke", action="store_true", help="tiny random model (CPU dry run)")
    parser.add_argument("--runs", type=int, default=20, help="batch-1 requests timed (compiled variants)")
    parser.add_argument("--slow-runs", type=int, default=8, help="batch-1 requests timed (eager variants)")
    parser.add_argument("--batch-repeats", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--rounds", type=int, default=8, help="requests per client through the API")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--variants",
        default="expert,engine-compile,naive,engine",
        help="comma list of " + ", ".join(VARIANTS) + " (the compiled ones first: they matter most)",
    )
    parser.add_argument(
        "--levers",
        default="gc_freeze_clients,switch_interval",
        help="optional lever measurements of engine-compile beyond gc.freeze's latency: "
        "gc_freeze_clients, switch_interval (each one more 8-client load)",
    )
    parser.add_argument(
        "--in-process",
        default="",
        help="comma list of naive, expert: also measured inside engine-compile's process after its numbers (one "
        "compile for both, when device time is short); their cold start and peak memory are then not measured",
    )
    parser.add_argument("--save-artifacts", type=Path, help=argparse.SUPPRESS)  # worker: engine-compile's file
    parser.add_argument("--ready-only", action="store_true", help=argparse.SUPPRESS)  # worker: a cold start only
    parser.add_argument("--deadline-s", type=float, help="start no variant later than this many seconds minus 30")
    parser.add_argument("--out", type=Path, help="folder (or .json file) for the results")
    parser.add_argument(
        "--resume",
        type=Path,
        help="a report of this run's earlier call (same versions, same GPU model): its results are kept, "
        "the variants of this call are added",
    )
    parser.add_argument("--note", default="", help="stored in the report (how it was run, what differs)")
    args = parser.parse_args()
    if args.worker:
        worker = {
            "naive": lambda: worker_diffusers(args, fused=False),
            "expert": lambda: worker_diffusers(args, fused=True),
            "engine": lambda: worker_engine(args),
        }[args.worker]
        print(json.dumps(worker()), flush=True)
        return

    if unknown := sorted(set(args.variants.split(",")) - set(VARIANTS)):
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    started = time.perf_counter()
    prepare_weights(args)
    base_env = os.environ | {
        "PUNKS_WEIGHTS_DIR": str(args.weights),
        "PUNKS_BASE_MODEL": str(args.weights / "stable-diffusion-v1-5"),
        "PUNKS_STEPS": str(args.steps),
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/bench-inductor"),
        "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR", "/tmp/bench-inductor/triton"),  # shared too
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = shlex.join(["python", "-m", "bench.bench", *sys.argv[1:]])
    this_part = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "command": command} | gpu_identity()
    report = {
        "environment": environment(),
        "command": command,
        "note": args.note,
        "steps": args.steps,
        "runs": {"compiled": args.runs, "eager": args.slow_runs, "per_batch_size": args.batch_repeats},
        "model": "smoke" if args.smoke else "full-size SD1.5, random weights, rank-32 LoRA",
        "weights_prepared_s": round(time.perf_counter() - started, 1),
        "results": {},
    }
    if args.resume:
        report = resumed(json.loads(args.resume.read_text()), report)
    report["parts"] = report.get("parts", []) + [this_part | {"variants": args.variants.split(",")}]
    path = results_path(args.out, report["environment"])

    def save(variant: str, result: dict) -> None:  # after every number, so a run cut short still leaves them
        report["results"][variant] = {"part": len(report["parts"])} | result  # which part measured it
        report["parts"][-1]["elapsed_s"] = round(time.perf_counter() - started, 1)
        if path:
            path.with_suffix(".tmp").write_text(json.dumps(report, indent=2) + "\n")
            path.with_suffix(".tmp").replace(path)

    if "engine-compile" in args.variants.split(","):
        (args.weights / ARTIFACTS).unlink(missing_ok=True)  # engine-compile-artifacts uses this run's file only
    for variant in args.variants.split(","):
        kind, variant_env = VARIANTS[variant]
        if args.deadline_s and time.perf_counter() - started > args.deadline_s - 30:
            save(variant, {"skipped": "not started: too little of the run's time left"})
            continue
        print(f"{variant} ({round(time.perf_counter() - started)} s into the run)", flush=True)
        save(variant, {"started_s_into_part": round(time.perf_counter() - started, 1)})  # stays if it never ends
        try:
            extra_env, extra = variant_setup(variant, args)
            env = base_env | variant_env | extra_env
            result = run_worker(
                kind,
                extra,
                args,
                env,
                lambda partial, variant=variant: save(variant, partial),
                lambda other, numbers: save(other, report["results"].get(other, {}) | numbers),
            )
        except Exception as error:  # keep the other variants' numbers (and this one's partial ones)
            result = report["results"].get(variant, {}) | {"error": f"{type(error).__name__}: {error}"[-3000:]}
        save(variant, result)
        print(variant, json.dumps(result), flush=True)
    print(json.dumps(report, indent=2))
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
