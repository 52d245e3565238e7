"""The CPU time a render spends outside the models, with diffusers' pipeline as it comes and as the engine runs it.

    python -m bench.pipeline_overhead --out bench/results/        # CPU: full-size SD1.5 architecture, 64 px, 2 steps
    python -m bench.pipeline_overhead --size 512 --steps 25        # on a CUDA machine

A compiled batch-1 render is ~180 ms of GPU work; whatever the GPU thread does in Python around the models adds
to every request's latency and, under load, holds the GIL the other threads need. Measured on the full-size
SD1.5 architecture (random weights; the module count is what matters here):

- `execution_device_ms`: one read of `pipe._execution_device`, which diffusers' pipeline evaluates on each call
  (it walks every module of every component for offload hooks) and service.loading.OneDevicePipeline answers
  from the UNet's device;
- `outside_models_ms`: one pipeline call (prompt embeddings given, as the engine calls it) less the time inside
  the UNet and the VAE decode (timed around each, synchronized on CUDA), for diffusers' output_type="pil" and
  the engine's output_type="pt" + service.engine.to_pil;
- `to_pil_ms`: turning one decoded 512 px image into a PIL image both ways (diffusers' postprocess copies it to
  the CPU and scales it in float32 there; to_pil does that on the model's device) and whether both give the same
  bytes.
Each figure is the median of `--repeats` runs after one warm-up.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.bench import environment  # bench/bench.py
from devtools.smoke import build_full_size_pipeline
from service.engine import to_pil
from service.loading import OneDevicePipeline, set_scheduler

REPO = Path(__file__).resolve().parents[1]


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)


class ModelClock:
    """Seconds spent inside the wrapped model calls (synchronized on CUDA, so queued GPU work counts as inside)."""

    def __init__(self, device: torch.device) -> None:
        self.inside = 0.0
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def wrap(self, owner: object, name: str) -> None:
        call = getattr(owner, name)

        def timed(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            result = call(*args, **kwargs)
            self.sync()
            self.inside += time.perf_counter() - started
            return result

        setattr(owner, name, timed)


def outside_models_ms(pipe, clock: ModelClock, kwargs: dict, engine_output: bool, repeats: int) -> float:
    def call() -> float:
        clock.inside = 0.0
        started = time.perf_counter()
        if engine_output:
            to_pil(pipe(**kwargs, output_type="pt").images)
        else:
            pipe(**kwargs, output_type="pil")
        return time.perf_counter() - started - clock.inside

    call()
    return round(1000 * statistics.median(call() for _ in range(repeats)), 3)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image side in px (64: the CPU's UNet stays short)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, help="folder for the results file")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32
    plain = build_full_size_pipeline().to(device, dtype)
    set_scheduler(plain, "dpm++")  # the engine's default sampler
    plain.set_progress_bar_config(disable=True)
    one_device = OneDevicePipeline(**plain.components, requires_safety_checker=False)
    one_device.set_progress_bar_config(disable=True)
    clock = ModelClock(device)
    clock.wrap(plain.unet, "forward")  # shared by both pipelines: the same module objects
    clock.wrap(plain.vae, "decode")

    embeddings = torch.randn(2, 1, 77, 768, device=device, dtype=dtype)
    kwargs = {
        "prompt_embeds": embeddings[0],
        "negative_prompt_embeds": embeddings[1],
        "num_inference_steps": args.steps,
        "guidance_scale": 7.0,
        "height": args.size,
        "width": args.size,
        "generator": [torch.Generator("cpu").manual_seed(0)],
    }
    decoded = torch.rand(1, 3, 512, 512, device=device, dtype=dtype) * 2 - 1  # a VAE decode's output range

    def diffusers_pil() -> list:
        return plain.image_processor.postprocess(decoded, output_type="pil")

    def engine_pil() -> list:
        return to_pil(plain.image_processor.postprocess(decoded, output_type="pt"))

    report = {
        "environment": environment(),
        "command": " ".join(["python", "-m", "bench.pipeline_overhead", *sys.argv[1:]]),
        "model": f"full-size SD1.5 architecture, random weights, {dtype}, DPM++ 2M",
        "image": f"{args.size} px, {args.steps} steps, batch 1",
        "unit": f"ms, median of {args.repeats}",
        "execution_device_ms": {
            "diffusers": median_ms(lambda: plain._execution_device, args.repeats),
            "OneDevicePipeline": median_ms(lambda: one_device._execution_device, args.repeats),
        },
        "outside_models_ms": {
            "diffusers, output_type pil": outside_models_ms(plain, clock, kwargs, False, args.repeats),
            "OneDevicePipeline, output_type pt + to_pil": outside_models_ms(
                one_device, clock, kwargs, True, args.repeats
            ),
        },
        "to_pil_ms": {
            "diffusers postprocess pil": median_ms(diffusers_pil, args.repeats),
            "engine postprocess pt + to_pil": median_ms(engine_pil, args.repeats),
            "same_bytes": bool(np.array_equal(np.asarray(diffusers_pil()[0]), np.asarray(engine_pil()[0]))),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        gpu = report["environment"]["gpu"].replace(" ", "-") if cuda else "cpu"
        path = args.out / f"{report['environment']['date']}-pipeline-overhead-{gpu}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
