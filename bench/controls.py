"""What the pixel-art controls cost: the palette mapping and the background mask on the CPU, per image, and the
render time of variations (img2img) against text to image on a GPU.

    python -m bench.controls --out bench/results/            # CPU: one core, 200 training-style portraits
    python -m bench.controls --img2img --out bench/results/  # GPU: the loaded engine, text to image vs variations

CPU: each portrait (train/sprites.py: flat and 2x2-checkered backgrounds, 8-12 colours) is snapped from its clean
512 px render, then timed on one core (single-threaded BLAS) with the fastest of `--repeats` runs counting: the
background mask alone, the palette mapping alone (PICO-8's 16 colours, the Game Boy's 4), both with the
transparent background, and the whole snap with and without them. The targets: a few milliseconds per image.

GPU: the median seconds of one request of 1 and of 4 images, text to image and variations of a training-style
sprite at strength 0.3, 0.6 and 0.9 (a variation runs int(steps x strength) of the steps, plus the VAE encoder), on
the full-size SD1.5 architecture with random weights (built into --weights on the first run, as bench.bench does).
"""

import os

if __name__ == "__main__":  # single-threaded BLAS, set before numpy is imported (not when a test imports this)
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_variable] = "1"

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from service.pixelart import to_pixel_art, upscale
from service.sprite_controls import PRESETS, apply_controls, background_mask
from train import sprites

PROMPT = "lad with a red beanie, green background"


def fastest_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
        "max_ms": round(ordered[-1], 3),
    }


def cpu_costs(count: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    cases: dict[str, Callable[[np.ndarray, Image.Image], object]] = {
        "background_mask": lambda sprite, render: background_mask(sprite),
        "palette_pico8": lambda sprite, render: apply_controls(sprite, PRESETS["pico-8"], "keep"),
        "palette_game_boy": lambda sprite, render: apply_controls(sprite, PRESETS["game-boy"], "keep"),
        "palette_pico8_transparent": lambda sprite, render: apply_controls(sprite, PRESETS["pico-8"], "transparent"),
        "snap_without_controls": lambda sprite, render: to_pixel_art(render),
        "snap_pico8_transparent": lambda sprite, render: to_pixel_art(
            render, palette=PRESETS["pico-8"], background="transparent"
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(count):
        render = upscale(Image.fromarray(sprites.render(sprites.random_punk(rng))), 512).convert("RGB")
        sprite = np.asarray(to_pixel_art(render).sprite)
        for name, case in cases.items():
            times[name].append(fastest_ms(lambda c=case, s=sprite, r=render: c(s, r), repeats))
    return {name: summary(values) for name, values in times.items()}


def gpu_costs(args: argparse.Namespace) -> dict:
    import torch

    from bench.bench import environment, prepare_weights  # bench/bench.py: the full-size random model
    from service.config import Settings
    from service.engine import Engine, GenerationRequest

    prepare_weights(args)
    full_size = {"weights_dir": args.weights, "base_model": args.weights / "stable-diffusion-v1-5"}
    engine = Engine.load(Settings(**full_size, compile=args.compile))
    start = Image.fromarray(sprites.render(sprites.random_punk(np.random.default_rng(0))))  # a training-style sprite

    def seconds(request: GenerationRequest) -> float:
        engine.generate(request)
        runs = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            engine.generate(request)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - started)
        return round(statistics.median(runs), 4)

    rows = []
    for images in (1, 4):
        rows.append({"images": images, "strength": None, "s": seconds(GenerationRequest(PROMPT, 7, images))})
        for strength in (0.3, 0.6, 0.9):
            request = GenerationRequest(PROMPT, 7, images, image=start, strength=strength)
            rows.append({"images": images, "strength": strength, "s": seconds(request)})
    return {
        "environment": environment(),
        "model": "full-size SD1.5, random weights, rank-32 LoRA",
        "steps": engine.settings.steps,
        "compile": engine.settings.compile,
        "requests": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img2img", action="store_true", help="the GPU part: variations' render time")
    parser.add_argument("--count", type=int, default=200, help="portraits (CPU part)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the JSON report into this folder")
    parser.add_argument("--weights", type=Path, default=Path("/tmp/bench-weights"), help="GPU part: model folder")
    parser.add_argument("--compile", action="store_true", help="GPU part: PUNKS_COMPILE=true")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # prepare_weights' tiny model
    args = parser.parse_args()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "repeats": args.repeats,
    }
    if args.img2img:
        report |= gpu_costs(args)
        name = f"{report['date']}-controls-img2img-{report['environment']['gpu'].replace(' ', '-')}.json"
    else:
        if hasattr(os, "sched_setaffinity"):  # one core, as the snapper's own benchmark
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        report |= {"portraits": args.count, "one_core": True, "per_image": cpu_costs(args.count, args.repeats)}
        name = f"{report['date']}-controls-cpu.json"
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        (args.out / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
