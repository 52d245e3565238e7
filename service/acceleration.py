"""GPU speed-ups that keep the image the same within fp16 tolerance.

An SD1.5 UNet step at batch 1 is launch-bound on an H100 (the GPU idles between small kernels), so
the big win is CUDA graphs via torch.compile(mode="reduce-overhead"). Graphs are recorded per input
shape, so batches are padded up to a few fixed sizes (buckets) that are all compiled at start-up.
"""

import logging
import os
from pathlib import Path

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
    load_compile_artifacts(settings.compile_artifacts_path())
    log.info("compiling UNet and VAE decoder with CUDA graphs (cache: %s)", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)


def load_compile_artifacts(path: Path) -> None:
    """Fill the compile caches from `python -m service compile-cache`'s file, when there is one. It is only a
    cache: one made by other versions or another GPU is ignored with a warning and the compile starts from scratch."""
    if not path.is_file():
        return
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())  # None: torch could not read it (it logs why)
    except Exception as error:  # a file it reads but cannot apply
        info, why = None, f"{type(error).__name__}: {error}"
    else:
        why = "not a compile cache of this torch"
    if info is None:
        log.warning("ignoring the compile cache %s (%s); compiling from scratch", path, why)
        return
    log.info(
        "compile cache loaded from %s: %s",
        path,
        ", ".join(f"{len(keys)} {kind}" for kind, keys in info.artifacts.items()),
    )


def save_compile_artifacts(path: Path) -> int:
    """Write what this process compiled (torch.compiler.save_cache_artifacts) to `path`; returns its size."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch recorded no compile artifacts in this process")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(saved[0])
    return len(saved[0])


def bucket_size(images: int, buckets: tuple[int, ...]) -> int:
    """The smallest compiled batch size that holds `images` (or `images` itself beyond the largest)."""
    return min((b for b in buckets if b >= images), default=images)
