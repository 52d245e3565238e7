"""What each GPU option does to one UNet step and one VAE decode, on the full-size SD1.5 architecture.

    python -m bench.step_options --out bench/results/      # on a CUDA machine (an H100 for the published numbers)

fp16, random weights, channels_last. Each call of the (uncompiled) modules is captured in a CUDA graph
and timed by replaying it, so the numbers are the kernels' GPU time without launch overhead (eager calls
on the GPU are launch-bound and would hide every option). The engine's compiled UNet fuses more
(about 35 ms per step at 8 images against 59 ms here), so this says whether an option changes the
kernels' work, not the compiled step time. For each option: median milliseconds per UNet
forward at several batch sizes (a batch of n images is 2n UNet rows with classifier-free guidance)
and per VAE decode, and the largest difference from the plain output (each option must keep the
image the same within fp16 tolerance). Tells which options are worth enabling in
service/acceleration.py, and records the ones that were tried and did not help.
"""

import argparse
import json
import statistics
from contextlib import contextmanager, nullcontext
from datetime import date
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from devtools.smoke import build_full_size_pipeline


def graphed_ms(run) -> float:
    """Capture `run` in a CUDA graph (after warm-up on a side stream, as CUDA graphs require) and time replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return median_ms(graph.replay)


def median_ms(run, repeats: int = 15, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


@contextmanager
def cudnn_benchmark(enabled: bool):
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


OPTIONS = {  # name -> (context for the run, fuse q/k/v projections)
    "plain": (nullcontext, False),
    "cudnn.benchmark": (lambda: cudnn_benchmark(True), False),
    "fused qkv": (nullcontext, True),
    "sdpa flash only": (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]), False),
    "sdpa cudnn only": (lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), False),
    "sdpa efficient only": (lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), False),
}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="1,4,8", help="batch sizes in images (UNet rows: twice as many)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(size) for size in args.images.split(",")]

    pipe = build_full_size_pipeline().to("cuda", torch.float16)
    unet, vae = pipe.unet, pipe.vae
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    generator = torch.Generator("cuda").manual_seed(0)
    inputs = {
        n: (
            torch.randn(2 * n, 4, 64, 64, device="cuda", dtype=torch.float16, generator=generator),
            torch.randn(2 * n, 77, 768, device="cuda", dtype=torch.float16, generator=generator),
        )
        for n in sizes
    }
    timestep = torch.tensor(500, device="cuda")
    latents = torch.randn(4, 4, 64, 64, device="cuda", dtype=torch.float16, generator=generator)

    report = {
        "date": date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "unit": "GPU ms per call (CUDA graph replay), median of 15",
        "options": {},
    }
    reference = None
    fused = False
    for name, (context, fuse_qkv) in OPTIONS.items():
        if fuse_qkv and not fused:
            unet.fuse_qkv_projections()
            fused = True
        elif fused and not fuse_qkv:
            unet.unfuse_qkv_projections()
            fused = False
        row = {}
        for part, call in [
            *((f"unet_{n}_images", partial(unet, inputs[n][0], timestep, inputs[n][1])) for n in sizes),
            ("vae_decode_4_images", partial(vae.decode, latents)),
        ]:
            try:
                with context():
                    row[part] = graphed_ms(call)
            except RuntimeError as error:  # an attention backend that does not take these shapes (VAE: head dim 512)
                row[part] = "error: " + str(error).splitlines()[0][:200]
        if isinstance(row[f"unet_{sizes[0]}_images"], float):
            with context():
                output = unet(inputs[sizes[0]][0], timestep, inputs[sizes[0]][1]).sample.float()
            reference = output if reference is None else reference
            row["max_abs_difference"] = round((output - reference).abs().max().item(), 5)
        report["options"][name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(report, indent=2))
    if args.out:
        path = args.out / f"{report['date']}-{report['gpu'].replace(' ', '-')}-step-options.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
