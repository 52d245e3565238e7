"""Cog runner for Replicate: a description in, 1024 px pixel-art portraits (and optionally their 24x24
sprites) out. Thin on purpose: parse the input, submit it to the engine's batcher, write the encoded files.

Concurrent predictions share GPU batches exactly as the HTTP service's requests do: `run` is async and marked
`@cog.concurrent(max=8)` (cog build bakes that into the image as COG_MAX_CONCURRENCY), so coglet runs up to 8
of them on its one event loop; each awaits the same Batcher (service/batcher.py), which renders them in shared
batches on the one GPU thread and snaps them on other threads (in the engine's snap processes on a GPU) while the
GPU goes on. Cancelling a prediction (Replicate's cancel route) cancels its await: a queued one leaves the queue
unrendered.

Served by `python -m cog.server.http` (coglet) with COG_PREDICT_TYPE_STUB=predict.py:Runner; cog.yaml says
`run: "predict.py:Runner"`. Inputs are validated by coglet against .cog/openapi_schema.json, which
`cog build` writes and `python -m devtools.cog_schema` regenerates (committed, checked by the tests).

The numbers inside Input(...) are literals, not service.config constants, because `cog build`
derives the schema by *statically* parsing this file: it silently drops a bound it cannot read as a
literal (and an unreadable default makes the input required). tests/test_predict.py checks that every literal
equals its service.config counterpart. Empty steps/guidance/output_size/integer_scale mean the deployment's
PUNKS_* setting.

The output is an object (images, sprites, smooth, seeds), not a flat list: in upload mode coglet uploads the
files of a returned list concurrently and lists each URL when its upload ends, so a list's order would change
from run to run. coglet 0.23 sends the files of an object inline as data URLs, in order.

Not an input: the smooth Real-ESRGAN upscale. A deployment offers it by setting PUNKS_UPSCALER=realesrgan (and
shipping its weights); every prediction then also returns `smooth`. An input would offer it where it fails.

`lora_url` takes a LoRA the way production Replicate models do (cog-flux, cog-sdxl): an SD1.5 kohya file at an
https:// or hf:// URL, downloaded once into a bounded LRU cache (service/lora/cache.py, PUNKS_LORA_URL_CACHE_SIZE;
cog.yaml enables it) under the download policy (service/weights/policy.py: public hosts only, deadlines, a size
cap; its own threads, stopped on cancel), checked by the start-up LoRA guard (family, keys, shapes, finite values:
a wrong file is a failed prediction with the guard's message), then fused for this prediction only (and later
ones naming the same URL): it never becomes a name others can pick. Failure messages never name server paths.

Not an input either: the LoRA strength. The engine fuses the LoRA into the weights once at setup and drops
the adapter, so a per-request scale would mean reloading the model; set PUNKS_LORA_SCALE instead.
"""

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path as FsPath
from typing import TypeVar, overload

import cog
from cog import BaseModel, BaseRunner, Input, Path
from PIL import Image

from service.batcher import Batcher
from service.config import Settings
from service.delivery import describe, encode_images, warnings
from service.engine import Engine, GenerationRequest
from service.errors import RequestError
from service.images import read_image_file
from service.lora.cache import CachedLora, LoraUrlCache
from service.metrics import Metrics
from service.sprite_controls import palette_from_text
from service.weights.fetch import fetch_weights_from_env
from service.weights.policy import DownloadPolicy

log = logging.getLogger("predict")

KEPT_OUTPUT_FOLDERS = 32  # coglet reads a prediction's files after run() returns: remove only much older ones
T = TypeVar("T")


class Output(BaseModel):
    images: list[Path]  # the full-size portraits, in seed order
    sprites: list[Path] | None  # with return_sprites: each grid x grid sprite, same order
    smooth: list[Path] | None  # deployments with PUNKS_UPSCALER=realesrgan: each raw generation upscaled smoothly
    seeds: list[int]  # image i's seed


class Runner(BaseRunner):
    async def setup(self) -> None:
        """Load the engine on its own GPU thread (CUDA graphs replay only on the thread that recorded them) and
        start the batcher on coglet's event loop, where every run() awaits it."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        started = time.perf_counter()
        settings = Settings()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, fetch_weights_from_env, settings.weights_dir)  # no-op without the variable
        log.info("setup: weights ready in %.1fs", time.perf_counter() - started)
        self._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="punks-gpu")
        self.engine = await loop.run_in_executor(self._gpu_thread, Engine.load, settings)  # WeightsError names files
        self.batcher = Batcher.for_engine(self.engine, Metrics(), self._gpu_thread)
        self.lora_cache = LoraUrlCache(
            settings.lora_url_cache_dir,
            settings.lora_url_cache_size,
            self._on_gpu_thread(self.engine.add_lora),
            self._on_gpu_thread(self.engine.remove_lora),
            DownloadPolicy.for_settings(settings),
            settings.download_workers,
        )
        self._outputs = FsPath(tempfile.mkdtemp(prefix="punks-cog-"))
        self._folders: deque[FsPath] = deque()
        log.info("setup: done in %.1fs", time.perf_counter() - started)

    @cog.concurrent(max=8)
    async def run(
        self,
        # One plain string literal per description (no implicit concatenation): cog build's static parser
        # takes a concatenated string's source text verbatim, quotes and newline included.
        prompt: str = Input(
            description="Short description of the punk, e.g. 'lad with a red beanie, green background'. The pixel-art trigger words are added for you.",
            min_length=1,
            max_length=500,
            regex=r"^\s*\S",
        ),
        seed: int | None = Input(
            default=None,
            ge=0,
            le=4294967295,
            description="Random seed; leave empty for a random one. Image i (0-based) uses seed + i, so a seed gives the same image whatever num_outputs is. The seeds are printed in the logs.",
        ),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Number of portraits."),
        steps: int | None = Input(
            default=None, ge=1, le=100, description="Denoising steps; empty: the deployment's PUNKS_STEPS (25)."
        ),
        guidance: float | None = Input(
            default=None,
            ge=0.0,
            le=20.0,
            description="Classifier-free guidance scale; empty: the deployment's PUNKS_GUIDANCE (7.5).",
        ),
        scheduler: str | None = Input(
            default=None,
            choices=[
                "Euler",
                "Euler a",
                "DPM++ 2M",
                "DPM++ 2M Karras",
                "DPM++ SDE",
                "DPM++ SDE Karras",
                "DDIM",
                "UniPC",
                "Heun",
                "LMS",
                "LMS Karras",
                "PNDM",
            ],
            description="Sampler, by its AUTOMATIC1111 name; empty: the deployment's PUNKS_SCHEDULER (dpm++, which is DPM++ 2M).",
        ),
        output_size: int | None = Input(
            default=None,
            ge=24,
            le=4096,
            description="Side of each delivered image in px; empty: the deployment's PUNKS_OUTPUT_SIZE (1024). At 1024 the 24 cells are 42 or 43 px wide, unless integer_scale is set.",
        ),
        integer_scale: bool | None = Input(
            default=None,
            description="Make every cell exactly floor(output_size / 24) px; the image is then a little smaller than output_size (1008 px for 1024). Empty: the deployment's PUNKS_INTEGER_SCALE (false).",
        ),
        return_sprites: bool = Input(
            default=False,
            description="Also return each 24x24 sprite (one pixel per cell), in `sprites`, in the same order as `images`.",
        ),
        output_format: str = Input(
            default="png", choices=["png", "webp"], description="Lossless PNG or lossless WebP."
        ),
        lora: str = Input(default="", description="A LoRA name from weights/loras (empty: the served default LoRA)."),
        lora_url: str = Input(
            default="",
            description="Or the URL of an SD1.5 kohya LoRA (.safetensors): https://... or hf://owner/repo/path, optionally ending in #sha256=<hex>. Downloaded once and cached; a LoRA for SDXL/SD2 or with layers the model lacks fails the prediction. Not together with lora.",
        ),
        # pixel-art controls and variations
        palette: str = Input(
            default="",
            description="Every cell takes one of these colours: a preset (pico-8, game-boy) or up to 64 '#rrggbb' codes separated by commas. Distinct sprite colours stay distinct while the palette has room. Empty: the sprite's own colours.",
        ),
        background: str = Input(
            default="keep",
            description="keep, transparent (a PNG whose border-connected background has alpha 0) or a '#rrggbb' colour to recolour it.",
        ),
        image: Path | None = Input(
            default=None,
            description="Make variations of this image: a 24x24 sprite (drawn in cells of 21-22 px, as in training) or any PNG, JPEG or WebP of at most 2048 px a side.",
        ),
        strength: float = Input(
            default=0.6,
            ge=0.0,
            le=1.0,
            description="How far a variation may move from the image: the share of the steps run from it. Used only with image.",
        ),
    ) -> Output:
        """Up to 8 concurrent predictions are rendered in shared batches (service/batcher.py). A RequestError
        fails the prediction with a message free of server paths."""
        try:
            return await self._run(
                prompt,
                seed,
                num_outputs,
                steps,
                guidance,
                scheduler,
                output_size,
                integer_scale,
                return_sprites,
                output_format,
                lora,
                lora_url,
                palette,
                background,
                image,
                strength,
            )
        except RequestError as error:
            raise RequestError(error.field, error.public_reason) from None

    async def _run(
        self,
        prompt: str,
        seed: int | None,
        num_outputs: int,
        steps: int | None,
        guidance: float | None,
        scheduler: str | None,
        output_size: int | None,
        integer_scale: bool | None,
        return_sprites: bool,
        output_format: str,
        lora: str,
        lora_url: str,
        palette: str,
        background: str,
        image: Path | None,
        strength: float,
    ) -> Output:
        # The schema rejects out-of-bounds values with a 422 before they get here; without it (or for what it
        # cannot say) GenerationRequest.check raises RequestError naming the field: a failed prediction.
        if lora and lora_url:
            raise RequestError("lora_url", "give either lora (a served name) or lora_url, not both")
        request = GenerationRequest(
            prompt=prompt,
            seed=_whole(seed),
            num_outputs=_whole(num_outputs),
            steps=_whole(steps),
            guidance=guidance,
            sampler=scheduler or None,
            lora=lora or None,
            output_size=_whole(output_size),
            integer_scale=integer_scale,
            output_format=output_format,  # type: ignore[arg-type]  # schema: choices
            return_sprites=return_sprites,
            palette=palette_from_text(palette) if palette.strip() else None,
            background=background,
            image=await asyncio.to_thread(_read_image, image) if image is not None else None,
            strength=strength if image is not None else None,
        )
        self.engine.check_request(request)
        started = time.perf_counter()
        # Held from download to result: the cache evicts no LoRA a queued or rendering request uses.
        held: contextlib.AbstractAsyncContextManager[CachedLora | None] = (
            self.lora_cache.use(lora_url) if lora_url else contextlib.nullcontext()
        )
        async with held as cached:
            if cached is not None:
                print(f"lora_url: {cached.shown}: {cached.info.describe()}")
                for note in self.engine.lora_warnings(cached.info):
                    print(f"warning: {note}")
                request = dataclasses.replace(request, lora=cached.name)
            done = await self.batcher.submit(request)
        result = done.result
        print(f"rendered in a batch of {done.batch_images} image(s) after {done.queue_wait_s:.2f}s in the queue")
        for note in warnings(result, self.engine.is_smoke):
            print(f"warning: {note}")
        for index, image in enumerate(result.images, start=1):
            print(f"image {index}: {describe(image)}")
        encoded = await asyncio.to_thread(encode_images, result.images, request.output_format, request.return_sprites)
        folder = self._new_output_folder()

        def save(name: str, data: bytes) -> Path:
            path = folder / f"{name}.{request.output_format}"
            path.write_bytes(data)
            return Path(path)

        output = Output(
            images=[save(f"punk-{i}", item.image) for i, item in enumerate(encoded, start=1)],
            sprites=[save(f"punk-{i}.sprite", item.sprite) for i, item in enumerate(encoded, start=1) if item.sprite]
            or None,
            smooth=[save(f"punk-{i}.smooth", item.smooth) for i, item in enumerate(encoded, start=1) if item.smooth]
            or None,
            seeds=[image.seed for image in result.images],
        )
        self.record_metric("seeds", output.seeds)
        self.record_metric("pixel_art", [image.art.quality.is_pixel_art for image in result.images])
        self.record_metric("batch_images", done.batch_images)
        print(f"generated {len(result.images)} image(s), {result.steps} steps, in {time.perf_counter() - started:.1f}s")
        return output

    def _on_gpu_thread(self, call: Callable[..., T]) -> Callable[..., T]:
        """`call` run on the engine's GPU thread, between batches (Engine.add_lora says why); blocks the calling
        thread, so the LoRA cache calls it from its worker threads, never from the event loop."""
        return lambda *args: self._gpu_thread.submit(call, *args).result()

    def _new_output_folder(self) -> FsPath:
        """One folder per prediction; the oldest go once KEPT_OUTPUT_FOLDERS newer ones exist (sent long since)."""
        folder = FsPath(tempfile.mkdtemp(dir=self._outputs))
        self._folders.append(folder)
        while len(self._folders) > KEPT_OUTPUT_FOLDERS:
            shutil.rmtree(self._folders.popleft(), ignore_errors=True)
        return folder


def _read_image(path: FsPath | str) -> Image.Image:
    """The `image` input, decoded and checked (service/images.py): RequestError naming `image` otherwise. coglet
    hands on a value that is no URL as the string it was (its schema says format uri, but it does not check)."""
    if not isinstance(path, FsPath):
        raise RequestError("image", "must be the URL of an image file (https:// or a data: URL)")
    return read_image_file(path)


# Typed as run() declares its inputs; at run time a float can arrive where it says int (see the docstring).
@overload
def _whole(value: int) -> int: ...
@overload
def _whole(value: int | None) -> int | None: ...
def _whole(value: int | float | None) -> int | float | None:
    """Cog's schema lets a whole-number float such as 5.0 through for an integer input: take it as the integer.
    Any other float stays a float, which GenerationRequest.check refuses naming the field."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
