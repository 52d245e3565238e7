"""The opt-in FP8 mode (PUNKS_FP8) against fp16 on one GPU: speed of the compiled UNet, drift of the images.

    python -m bench.fp8 --out bench/results/                 # on a CUDA machine of compute capability 8.9+ (H100, H200)

Drift: the same engine (eager, 25 steps, >= 16 seeds) renders every seed in fp16, then its UNet goes through
the very call PUNKS_FP8 makes (service.acceleration.quantize_unet_fp8, after the LoRA is fused) and renders
them again: max and mean absolute difference of the 512 px images, and cells of the snapped 24x24 sprite that
changed. On two models: the full-size SD1.5 architecture with random weights + a random rank-32 LoRA (as
bench/bench.py builds it: realistic layer sizes, but noise images, whose sprites are not portraits), and the
trained demo model (devtools/demo_model: small layers, but real portraits, so the sprite cells mean something).

Speed: the UNet alone on the full-size model, compiled as the engine compiles it (reduce-overhead, fullgraph,
channels_last), one denoising step at batch 2 and 8 (one and four images with classifier-free guidance), fp16
then FP8, timed with CUDA events. The rest of a render (text encoder, scheduler, VAE decode) does not change.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.bench import PROMPT, environment, prepare_weights, results_path  # bench/bench.py
from bench.step_options import median_ms  # bench/step_options.py: CUDA-event median of a call
from service.acceleration import quantize_unet_fp8

REPO = Path(__file__).resolve().parents[1]

PARTS = ("drift", "drift-demo", "speed")  # in the order they run; all three overran a 420 s call on the H200
PROMPTS = (PROMPT, "punk with a cap, blue background", "punk with a cap, red background", "lad with sunglasses")


def drift(engine, seeds: int, steps: int) -> dict:
    """Render `seeds` images in fp16, quantize the engine's UNet to FP8 in place, render them again, compare."""
    import numpy as np

    from service.engine import GenerationRequest

    seconds: dict[str, float] = {}

    def render_all(mode: str) -> list:
        started = time.perf_counter()
        images = [
            engine.generate(
                GenerationRequest(PROMPTS[seed % len(PROMPTS)], seed=seed, num_inference_steps=steps)
            ).images[0]
            for seed in range(seeds)
        ]
        seconds[mode] = round((time.perf_counter() - started) / seeds, 4)
        return images

    fp16 = render_all("fp16")
    layers = quantize_unet_fp8(engine.pipe.unet, engine.settings.torch_device)
    fp8 = render_all("fp8")
    per_seed = []
    for a, b in zip(fp16, fp8, strict=True):
        raw = np.abs(np.asarray(a.raw, np.int16) - np.asarray(b.raw, np.int16))
        cells = np.any(np.asarray(a.art.sprite.convert("RGB")) != np.asarray(b.art.sprite.convert("RGB")), axis=-1)
        per_seed.append(
            {
                "max_abs_px": int(raw.max()),
                "mean_abs_px": round(float(raw.mean()), 3),
                "sprite_cells_changed": int(cells.sum()),
                "pixel_art_fp16": a.art.quality.is_pixel_art,
                "pixel_art_fp8": b.art.quality.is_pixel_art,
            }
        )
    changed = [s["sprite_cells_changed"] for s in per_seed]
    return {
        "seeds": seeds,
        "steps": steps,
        "fp8_layers": layers,
        "eager_s_per_image": seconds,  # generate + snap, one image at a time, uncompiled (launch-bound on a GPU)
        "max_abs_px": max(s["max_abs_px"] for s in per_seed),
        "mean_abs_px": round(statistics.mean(s["mean_abs_px"] for s in per_seed), 3),
        "sprite_cells_changed_median": statistics.median(changed),
        "sprite_cells_changed_max": max(changed),
        "sprites_identical": sum(c == 0 for c in changed),
        "verdict_changed": sum(s["pixel_art_fp16"] != s["pixel_art_fp8"] for s in per_seed),
        "per_seed": per_seed,
    }


def unet_step_ms(unet, batch: int, repeats: int = 30) -> float:
    """Median ms of one compiled UNet call at this batch (latents 64x64, 77-token text), after recording."""
    import torch

    latents = torch.randn(batch, 4, 64, 64, device="cuda", dtype=torch.float16)
    text = torch.randn(batch, 77, 768, device="cuda", dtype=torch.float16)
    timestep = torch.tensor(500, device="cuda")
    with torch.inference_mode():  # 3 warm-up calls: compile, record the CUDA graph, replay
        return median_ms(lambda: unet(latents, timestep, encoder_hidden_states=text), repeats, warmup=3)


def speed(fp16_unet, fp8_unet, batches: tuple[int, ...], save: Callable[[dict], None]) -> None:
    """Compiled UNet step of each model at each batch (fp16 then FP8, batch by batch), and the seconds to compile
    and time each; `save` gets the report after every number, so that a call cut short keeps what it measured."""
    import torch

    compiled = {
        "fp16": torch.compile(fp16_unet, mode="reduce-overhead", fullgraph=True),
        "fp8": torch.compile(fp8_unet, mode="reduce-overhead", fullgraph=True),
    }
    report: dict = {}
    for batch in batches:
        numbers = report.setdefault(str(batch), {})
        for mode, unet in compiled.items():
            started = time.perf_counter()
            numbers[f"{mode}_step_ms"] = unet_step_ms(unet, batch)
            numbers[f"{mode}_compile_and_time_s"] = round(time.perf_counter() - started, 1)
            save(report)
        numbers["speedup"] = round(numbers["fp16_step_ms"] / numbers["fp8_step_ms"], 3)
        save(report)


def load_engine(**settings):
    from service.config import Settings
    from service.engine import Engine

    return Engine.load(Settings(warmup=False, **settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("/tmp/bench-weights"))
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8], help="UNet batch (2 per image with CFG)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (all)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # prepare_weights' tiny model
    parser.add_argument("--out", type=Path, help="folder (or .json file) for the results")
    args = parser.parse_args()
    report: dict = {"environment": environment(), "command": " ".join(["python", "-m", "bench.fp8", *sys.argv[1:]])}
    path = results_path(args.out, report["environment"], "fp8")

    def save(key: str, value) -> None:
        report[key] = value
        print(key, json.dumps(value)[:600], flush=True)
        if path:
            path.write_text(json.dumps(report, indent=2) + "\n")

    prepare_weights(args)
    full_size = {"weights_dir": args.weights, "base_model": args.weights / "stable-diffusion-v1-5"}
    quantized = load_engine(**full_size)
    if "drift" in args.parts:
        save("drift_full_size_random", drift(quantized, args.seeds, args.steps))  # its UNet is FP8 from here on
    elif "speed" in args.parts:
        quantize_unet_fp8(quantized.pipe.unet, quantized.settings.torch_device)
    if "drift-demo" in args.parts:
        save("drift_demo_model", drift(load_engine(fallback_model="demo"), args.seeds, args.steps))
    if "speed" in args.parts:
        fp16 = load_engine(**full_size)
        speed(fp16.pipe.unet, quantized.pipe.unet, tuple(args.batches), lambda r: save("unet_step_full_size", r))
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
