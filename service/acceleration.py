"""GPU speed-ups that keep the image the same within fp16 tolerance.

An SD1.5 UNet step at batch 1 is launch-bound on an H100 (the GPU idles between small kernels), so
the big win is CUDA graphs via torch.compile(mode="reduce-overhead"). Graphs are recorded per input
shape, so batches are padded up to a few fixed sizes (buckets) that are all compiled at start-up.
"""

import logging
import os

import torch
from diffusers import StableDiffusionPipeline

from service.config import Settings

log = logging.getLogger(__name__)


def accelerate(pipe: StableDiffusionPipeline, settings: Settings) -> None:
    """channels_last on CUDA (cuDNN's fast convolution layout); optional compile with an on-disk cache."""
    if not settings.torch_device.startswith("cuda"):
        return
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if not settings.compile:
        return
    cache = settings.compile_cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    # Inductor reads these when it first compiles: kernels and FX graphs then survive restarts.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    log.info("compiling UNet and VAE decoder with CUDA graphs (cache: %s)", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)


def bucket_size(images: int, buckets: tuple[int, ...]) -> int:
    """The smallest compiled batch size that holds `images` (or `images` itself beyond the largest)."""
    return min((b for b in buckets if b >= images), default=images)
