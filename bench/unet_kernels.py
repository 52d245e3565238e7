"""Kernel-level levers of the full-size SD1.5 UNet and VAE decoder on one GPU, fp16, random weights.

    python -m bench.unet_kernels --out bench/results/             # on a CUDA machine (an H200)

Which attention kernel is fastest at SD1.5's attention shapes (flash, memory-efficient, cuDNN; timed eagerly),
and what each exact lever does to the UNet step compiled as the engine compiles it (reduce-overhead, fullgraph,
channels_last), at batch 2 and 8 (one and four images with classifier-free guidance):

    cudnn_benchmark   torch.backends.cudnn.benchmark: cuDNN times its convolution algorithms per shape
    cudnn_attention   scaled_dot_product_attention tries cuDNN first (sdpa_kernel's set_priority). The backend torch
                      picks at each shape under each lever is recorded (sdp_choice): on torch 2.11 and
                      the H200 it is cuDNN at every SD1.5 shape by default (torch puts cuDNN first on sm90 with
                      cuDNN >= 9.9), so there this lever is the default order
    fused_qkv         diffusers' unet.fuse_qkv_projections(): one matrix product for q, k and v
    conv_1x1_as_mm    Inductor lowers 1x1 convolutions to matrix products (diffusers' speed-up guide)
    freezing          Inductor freezing: weights become constants, folded and laid out for their kernels at compile
                      time (inference only; the engine's weights never change once its one LoRA is fused).
                      Measured 2026-12-03 (batch 2 in both orders): no gain, ...-unet-kernels-freezing-NVIDIA-H200.json
    coordinate_descent_tuning  Inductor tunes each generated kernel's block sizes by coordinate descent when it first
                      runs (diffusers' guide also sets check_all_directions; with it bench.py's
                      engine-compile-inductor-tuned never got ready); `*_compile_and_time_s` says what it costs

Each lever alone against the baseline, in one process (torch._dynamo.reset() between them; the on-disk compile
caches stay, and in torch 2.13's source their key leaves out the attention flags: an attention lever may reuse the
baseline's kernels). The VAE decoder (eager, per image) with and without cudnn_benchmark. Results are saved after
every number, so that a call cut short keeps what it measured.
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.bench import environment, results_path  # bench/bench.py
from bench.step_options import median_ms  # bench/step_options.py: CUDA-event median of a call

REPO = Path(__file__).resolve().parents[1]

INDUCTOR_LEVERS = ("conv_1x1_as_mm", "freezing", "coordinate_descent_tuning")  # each a torch._inductor.config flag
LEVERS = ("baseline", "cudnn_benchmark", "cudnn_attention", "fused_qkv", *INDUCTOR_LEVERS)
# (query tokens, key tokens, head dim) of SD1.5's attention at 512 px, 8 heads: self- then cross-attention
ATTENTION_SHAPES = ((4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (1024, 77, 80), (256, 256, 160), (256, 77, 160))


def unet_inputs(batch: int) -> tuple:
    import torch

    latents = torch.randn(batch, 4, 64, 64, device="cuda", dtype=torch.float16)
    text = torch.randn(batch, 77, 768, device="cuda", dtype=torch.float16)
    return latents, torch.tensor(500, device="cuda"), text


def attention_backends(batch: int) -> dict:
    """ms of scaled_dot_product_attention at each SD1.5 shape with each backend alone (None: not supported)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    report = {}
    for queries, keys, head_dim in ATTENTION_SHAPES:
        q = torch.randn(batch, 8, queries, head_dim, device="cuda", dtype=torch.float16)
        k = torch.randn(batch, 8, keys, head_dim, device="cuda", dtype=torch.float16)
        row: dict[str, float | None] = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    row[backend.name.lower()] = median_ms(lambda: F.scaled_dot_product_attention(q, k, k), 20, 3)  # noqa: B023
            except RuntimeError:
                row[backend.name.lower()] = None
        report[f"{queries}x{keys}x{head_dim}"] = row
    return report


@contextmanager
def lever(name: str, unet) -> Iterator[None]:
    """Switch one lever on for the duration (the UNet's fused projections are undone afterwards)."""
    import torch
    import torch._inductor.config as inductor
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with ExitStack() as undo:
        if name == "cudnn_benchmark":
            undo.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
            torch.backends.cudnn.benchmark = True
        elif name == "cudnn_attention":
            cudnn_first = [
                SDPBackend.CUDNN_ATTENTION,
                SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH,
            ]
            undo.enter_context(sdpa_kernel(cudnn_first, set_priority=True))
        elif name == "fused_qkv":
            unet.fuse_qkv_projections()
            undo.callback(unet.unfuse_qkv_projections)
        elif name in INDUCTOR_LEVERS:
            undo.enter_context(inductor.patch({name: True}))
        yield


def sdp_choice() -> dict[str, str]:
    """The attention backend torch picks at each SD1.5 shape (batch 2, contiguous inputs) under the flags set now:
    what a fresh trace would choose (a compile served from the cache keeps what it was traced with)."""
    import torch
    from torch.nn.attention import SDPBackend

    names = {backend.value: name.lower() for name, backend in SDPBackend.__members__.items()}
    chosen = {}
    for queries, keys, head_dim in ATTENTION_SHAPES:
        q = torch.randn(2, 8, queries, head_dim, device="cuda", dtype=torch.float16)
        k = torch.randn(2, 8, keys, head_dim, device="cuda", dtype=torch.float16)
        chosen[f"{queries}x{keys}x{head_dim}"] = names.get(torch._fused_sdp_choice(q, k, k), "unknown")
    return chosen


def compiled_step_ms(unet, batch: int) -> float:
    import torch

    torch._dynamo.reset()
    compiled = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
    latents, timestep, text = unet_inputs(batch)
    with torch.inference_mode():
        return median_ms(lambda: compiled(latents, timestep, encoder_hidden_states=text), 30, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8], help="UNet batch (2 per image with CFG)")
    parser.add_argument("--levers", nargs="+", choices=LEVERS, default=list(LEVERS))
    parser.add_argument("--deadline-s", type=float, default=540, help="start no compile after this many seconds")
    parser.add_argument("--out", type=Path, help="folder (or .json file) for the results")
    args = parser.parse_args()
    started = time.perf_counter()
    import torch

    from devtools.smoke import build_full_size_pipeline

    command = " ".join(["python", "-m", "bench.unet_kernels", *sys.argv[1:]])
    report: dict = {"environment": environment(), "command": command}
    path = results_path(args.out, report["environment"], "unet-kernels")

    def save(key: str, value) -> None:
        report[key] = value
        print(f"{time.perf_counter() - started:6.1f}s", key, json.dumps(value)[:800], flush=True)
        if path:
            path.write_text(json.dumps(report, indent=2) + "\n")

    pipe = build_full_size_pipeline().to("cuda", torch.float16)
    unet, vae = pipe.unet, pipe.vae
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        save("attention_ms_by_backend", {str(b): attention_backends(b) for b in args.batches})
        decoder = {}
        for name in ("baseline", "cudnn_benchmark"):
            with lever(name, unet):
                for images in (1, 4):
                    z = torch.randn(images, 4, 64, 64, device="cuda", dtype=torch.float16)
                    decoder[f"{name}_batch{images}"] = median_ms(lambda: vae.decode(z), 10, 3)  # noqa: B023
        save("vae_decode_eager_ms", decoder)
    steps: dict = {}
    for batch in args.batches:
        for name in args.levers:
            if time.perf_counter() - started > args.deadline_s:
                save("stopped", f"deadline {args.deadline_s} s reached before {name} at batch {batch}")
                return
            compile_started = time.perf_counter()
            with lever(name, unet):
                if batch == args.batches[0]:
                    save(f"sdp_choice_{name}", sdp_choice())
                steps.setdefault(str(batch), {})[name] = compiled_step_ms(unet, batch)
            steps[str(batch)][f"{name}_compile_and_time_s"] = round(time.perf_counter() - compile_started, 1)
            save("compiled_step_ms", steps)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
