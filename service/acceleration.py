"""GPU speed-ups that keep the image the same within fp16 tolerance.

An SD1.5 UNet step at batch 1 is launch-bound on an H100 (the GPU idles between small kernels), so
the big win is CUDA graphs via torch.compile(mode="reduce-overhead"). Graphs are recorded per input
shape, so batches are padded up to a few fixed sizes (buckets) that are all compiled at start-up.
"""

import itertools
import logging
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from service.config import Settings
from service.prompts import CHUNK_TOKENS, MAX_CHUNKS

log = logging.getLogger(__name__)


def accelerate(pipe: StableDiffusionPipeline, settings: Settings) -> "GraphedTextEncoder | None":
    """channels_last on CUDA (cuDNN's fast convolution layout); optional FP8 linear layers; optional compile with
    an on-disk cache, and then the text encoder's CUDA graphs (returned: what encodes prompts; None: the encoder
    itself, eagerly)."""
    cuda = settings.torch_device.startswith("cuda")
    if cuda:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.fp8:  # after channels_last, as bench/fp8.py measures it; refused off CUDA
        quantize_unet_fp8(pipe.unet, settings.torch_device)
    if not (cuda and settings.compile):
        return None
    cache = settings.compile_cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    # Inductor reads these when it first compiles: kernels and FX graphs then survive restarts.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    load_compile_artifacts(settings.compile_artifacts_path())
    if settings.fp8:
        log.warning(
            "fp8 with compile: on the H200 (torch 2.11, torchao 0.18) this compile did not finish within 9 minutes, "
            "even for one batch bucket (bench/results/2026-12-02-NVIDIA-H200.json); start-up may take that long"
        )
    log.info("compiling UNet and VAE decoder with CUDA graphs (cache: %s)", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)
    # the rows a compiled engine feeds the encoder: a batch bucket's prompts, or the negative prompt, in 1..3 chunks
    rows = {size * chunks for size in (1, *settings.batch_buckets) for chunks in range(1, MAX_CHUNKS + 1)}
    return GraphedTextEncoder(pipe.text_encoder, rows, CHUNK_TOKENS + 2)


class GraphedTextEncoder:
    """The text encoder's last hidden state, replayed from CUDA graphs captured at start-up, one per input shape a
    compiled engine feeds it; other shapes run eagerly. At batch 1 the eager encoder is launch-bound: its few hundred
    small kernels took 3.9-6.9 ms on the H200 hosts (bench/results/2026-12-02-NVIDIA-H200.json, text_encoder_ms),
    on the latency path before the first denoising step; a replay launches them all at once.

    The graphs read the weights where they lie: a compiled engine fuses its one LoRA before they are captured and
    refuses LoRA switching (service/engine.py), and weights or buffers moved to new memory are noticed at the next
    call, which captures the graphs again. Not for concurrent use: the engine encodes on its one GPU thread."""

    def __init__(self, encoder: torch.nn.Module, rows: set[int], tokens: int):
        self.encoder = encoder
        self.shapes = sorted((count, tokens) for count in rows)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._weights: list[int] = []
        self.capture()

    def _weight_addresses(self) -> list[int]:
        return [tensor.data_ptr() for tensor in itertools.chain(self.encoder.parameters(), self.encoder.buffers())]

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per shape, all in one memory pool (replays are one at a time, on one stream). From the first
        shape whose capture fails on, shapes stay eager, with a warning: slower, never wrong."""
        self._graphs.clear()
        device = next(self.encoder.parameters()).device
        stream = torch.cuda.current_stream(device)
        pool = None
        for shape in self.shapes:
            try:
                ids = torch.zeros(shape, dtype=torch.long, device=device)
                side = torch.cuda.Stream(device)
                side.wait_stream(stream)
                with torch.cuda.stream(side):  # lazy set-ups run here, before the capture (CUDA's documented recipe)
                    for _ in range(2):
                        self.encoder(ids)
                stream.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.encoder(ids)[0]
            except Exception as error:  # any capture failure: the rest of the shapes stay eager
                log.warning(
                    "text encoder: no CUDA graph from %s token ids on (%s: %s)", shape, type(error).__name__, error
                )
                break
            finally:  # a capture that fails as it ends leaves its own stream current (torch.cuda.graph's __exit__)
                torch.cuda.set_stream(stream)
            pool = graph.pool()
            self._graphs[shape] = (graph, ids, hidden)
        self._weights = self._weight_addresses()
        log.info("text encoder: CUDA graphs for %d of %d input shapes", len(self._graphs), len(self.shapes))

    @torch.inference_mode()  # the static inputs were made in inference mode: copy_ into them needs it too
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        shape = (input_ids.shape[0], input_ids.shape[1])
        if shape not in self._graphs:
            return self.encoder(input_ids)[0]
        if self._weight_addresses() != self._weights:
            log.warning("text encoder: its weights moved in memory; capturing its CUDA graphs again")
            self.capture()
            return self(input_ids)
        graph, ids, hidden = self._graphs[shape]
        ids.copy_(input_ids)
        graph.replay()
        return hidden.clone()  # the next replay overwrites `hidden`


def quantize_unet_fp8(unet: torch.nn.Module, device: str) -> int:
    """Swap the weights of the UNet's transformer-block linear layers (attention projections, feed-forward) for
    FP8 ones with one scale per tensor, activations quantized on the fly (torchao's float8 dynamic recipe; its
    per-row scales need bf16 weights, and the engine runs fp16). The convolutions, norms and the small
    time-embedding layers stay fp16. Returns the number of layers swapped.

    Raises ValueError (a setting this machine cannot honour), before anything is changed, where FP8 cannot run:
    no CUDA, a GPU older than compute capability 8.9, or no torchao."""
    if not device.startswith("cuda"):
        raise ValueError(f"fp8: PUNKS_FP8 needs a CUDA GPU of compute capability 8.9+ (device is {device!r})")
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < (8, 9):
        raise ValueError(
            f"fp8: {torch.cuda.get_device_name(torch.device(device))} has compute capability "
            f"{capability[0]}.{capability[1]}; FP8 matrix products need 8.9+ (Ada, Hopper); unset PUNKS_FP8"
        )
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_
    except ImportError as error:
        raise ValueError(
            "fp8: PUNKS_FP8 needs torchao (pip install torchao==0.18.0, the project's fp8 extra)"
        ) from error
    swapped = [name for name, module in unet.named_modules() if _fp8_target(module, name)]
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()), filter_fn=_fp8_target)
    log.info("fp8: %d linear layers of the UNet's transformer blocks quantized (torchao, per-tensor)", len(swapped))
    return len(swapped)


def _fp8_target(module: torch.nn.Module, name: str) -> bool:
    """Linear layers inside transformer blocks whose sides suit FP8 kernels (multiples of 16)."""
    return (
        isinstance(module, torch.nn.Linear)
        and ".transformer_blocks." in name
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


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
