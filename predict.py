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
equals its service.config counterpart, and every default the service's own default setting: the form on Replicate
shows the real 25 steps, 7.5 guidance and 1024 px.

Inputs carry the names every SD model on Replicate uses (num_inference_steps, guidance_scale, negative_prompt,
lora_weights, lora_scale, scheduler). coglet 0.23 drops an input the schema does not know (a warning in its own
log) instead of answering 422, so an old or misspelt name silently changes nothing; the README says so.

The output is a list of files, Replicate's convention (a gallery on the web, `for f in output` in the client):
the portraits, each named with its index and seed (out-0-seed7.png), then with return_sprites each sprite named
after its portrait (out-0-seed7-sprite.png), and on a deployment with PUNKS_UPSCALER=realesrgan each smooth
upscale (out-0-seed7-smooth.png). In upload mode coglet uploads a list's files concurrently and lists each URL
when its upload ends, so the order of the URLs varies: the names restore it. Seeds and the pixel-art verdicts
are in the logs and metrics.

`lora_weights` takes a LoRA the way production Replicate models do (cog-flux, cog-sdxl): an SD1.5 kohya file at
an https:// URL, a Hugging Face file (hf://owner/repo/file, owner/repo/file, or its huggingface.co blob/resolve
URL; `hf_api_token` for a private one), or a Replicate training's .tar holding one .safetensors, downloaded once
into a bounded LRU cache (service/lora/cache.py, PUNKS_LORA_URL_CACHE_SIZE; cog.yaml enables it) under the
download policy (service/weights/policy.py: public hosts only, deadlines, a size cap; its own threads, stopped on
cancel), checked by the start-up LoRA guard (family, keys, shapes, finite values: a wrong file is a failed
prediction with the guard's message), then fused for this prediction only (and later ones naming the same
URL): it never becomes a name others can pick. Failure messages never name server paths.

`image` is a string, as trainer.py's `input_images`: an https URL, fetched by run() under the same download policy
as lora_weights but capped at the input image size (service/weights/inputs.py; a cancelled prediction stops it), or a
data: URL, decoded under the same cap. A Cog `Path` input would have coglet fetch any URL itself, any host included,
before run() starts. Replicate's clients upload a local file and send its URL, so they work unchanged.

`lora_scale` re-fuses the LoRA at that strength from the kept base weights, as switching LoRAs does; predictions
of one scale share a batch, other scales get their own pipeline call. A compiled or fp8 deployment cannot
switch: it accepts only its PUNKS_LORA_SCALE and fails other scales naming lora_scale.
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
from cog import BaseRunner, Input, Path, Secret
from PIL import Image

from service.batcher import Batcher
from service.config import MAX_IMAGE_BYTES, Settings
from service.delivery import describe, encode_images, warnings
from service.engine import Engine, GenerationRequest
from service.errors import RequestError
from service.images import decode_image
from service.lora.cache import CachedLora, LoraUrlCache
from service.metrics import Metrics
from service.sprite_controls import palette_from_text
from service.weights.fetch import fetch_listed_weights
from service.weights.inputs import fetch_input
from service.weights.pinned import fetch_missing_weights
from service.weights.policy import DownloadPolicy

log = logging.getLogger("predict")

KEPT_OUTPUT_FOLDERS = 32  # coglet reads a prediction's files after run() returns: remove only much older ones
T = TypeVar("T")


def output_stem(index: int, seed: int) -> str:
    """A portrait's file name without extension: its place and seed, so that the order can be restored from the
    names whatever order the uploads finish in (its sprite and smooth files add -sprite and -smooth)."""
    return f"out-{index}-seed{seed}"


class Runner(BaseRunner):
    async def setup(self) -> None:
        """Load the engine on its own GPU thread (CUDA graphs replay only on the thread that recorded them) and
        start the batcher on coglet's event loop, where every run() awaits it."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        started = time.perf_counter()
        settings = Settings()
        loop = asyncio.get_running_loop()
        # PUNKS_WEIGHTS_URLS: a no-op when it is empty
        await loop.run_in_executor(None, fetch_listed_weights, settings.weights_urls, settings.weights_dir)
        if settings.fetch_at_setup:  # cog.yaml: what weights/ lacks, from the pinned SD1.5 source and PUNKS_LORA_URL
            await loop.run_in_executor(None, fetch_missing_weights, settings)
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
        self.image_policy = dataclasses.replace(DownloadPolicy.for_settings(settings), max_bytes=MAX_IMAGE_BYTES)
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
        negative_prompt: str = Input(
            default="",
            max_length=500,
            description="Things to keep out of the image, e.g. 'hat, glasses'. Added to the built-in negative prompt against blur, gradients and photo looks, which always stays.",
        ),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Number of portraits."),
        seed: int | None = Input(
            default=None,
            ge=0,
            le=4294967295,
            description="Random seed; leave empty for a random one. Image i (0-based) uses seed + i, so a seed gives the same image whatever num_outputs is. Each file name carries its seed (out-0-seed7.png).",
        ),
        num_inference_steps: int = Input(default=25, ge=1, le=100, description="Number of denoising steps."),
        guidance_scale: float = Input(default=7.5, ge=0.0, le=20.0, description="Classifier-free guidance scale."),
        scheduler: str = Input(
            default="DPM++ 2M",
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
            description="Sampler, by its AUTOMATIC1111 name.",
        ),
        lora: str = Input(default="", description="A LoRA name from weights/loras (empty: the served default LoRA)."),
        lora_weights: str = Input(
            default="",
            description="Or an SD1.5 kohya LoRA (.safetensors) to use instead: a URL (https://..., including huggingface.co/<owner>/<repo>/blob|resolve/<revision>/<file>), hf://<owner>/<repo>/<file> or <owner>/<repo>/<file> on Hugging Face, or a Replicate training's output .tar holding one .safetensors; optionally ending in #sha256=<hex>. Downloaded once and cached; a LoRA for SDXL/SD2 or with layers the model lacks fails the prediction. Not together with lora.",
        ),
        lora_scale: float = Input(
            default=1.0, ge=0.0, le=2.0, description="How strongly the LoRA is applied (0: the base model alone)."
        ),
        hf_api_token: Secret | None = Input(
            default=None,
            description="Hugging Face token, for a lora_weights file in a private or gated repository. Sent only to huggingface.co.",
        ),
        output_size: int = Input(
            default=1024,
            ge=24,
            le=4096,
            description="Side of each delivered image in px. At 1024 the 24 cells are 42 or 43 px wide, unless integer_scale is set.",
        ),
        integer_scale: bool = Input(
            default=False,
            description="Make every cell exactly floor(output_size / 24) px; the image is then a little smaller than output_size (1008 px for 1024).",
        ),
        return_sprites: bool = Input(
            default=False,
            description="Also return each 24x24 sprite (one pixel per cell), named after its portrait: out-0-seed7-sprite.png.",
        ),
        output_format: str = Input(
            default="png", choices=["png", "webp"], description="Lossless PNG or lossless WebP."
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
        image: str | None = Input(
            default=None,
            description="Make variations of this image, given as an https:// URL or a data: URL: a 24x24 sprite (drawn in cells of 21-22 px, as in training) or any PNG, JPEG or WebP of at most 2048 px a side and 8 MiB. Fetched from public hosts only.",
        ),
        strength: float = Input(
            default=0.6,
            ge=0.0,
            le=1.0,
            description="How far a variation may move from the image: the share of the steps run from it. Used only with image.",
        ),
    ) -> list[Path]:
        """Up to 8 concurrent predictions are rendered in shared batches (service/batcher.py). A RequestError
        fails the prediction with a message free of server paths."""
        try:
            request = GenerationRequest(
                prompt=prompt,
                negative_prompt=negative_prompt or None,
                seed=_whole(seed),
                num_outputs=_whole(num_outputs),
                num_inference_steps=_whole(num_inference_steps),
                guidance_scale=guidance_scale,
                sampler=scheduler or None,
                lora=lora or None,
                lora_scale=lora_scale,
                output_size=_whole(output_size),
                integer_scale=integer_scale,
                output_format=output_format,  # type: ignore[arg-type]  # schema: choices
                return_sprites=return_sprites,
                palette=palette_from_text(palette) if palette.strip() else None,
                background=background,
                image=await self._read_image(image) if image else None,
                strength=strength if image else None,
            )
            token = hf_api_token.get_secret_value() if hf_api_token is not None else None
            return await self._run(request, lora_weights, token or None)
        except RequestError as error:
            raise RequestError(error.field, error.public_reason) from None

    async def _run(self, request: GenerationRequest, lora_weights: str, token: str | None) -> list[Path]:
        # The schema rejects out-of-bounds values with a 422 before they get here; without it (or for what it
        # cannot say) GenerationRequest.check raises RequestError naming the field: a failed prediction.
        if request.lora and lora_weights:
            raise RequestError("lora_weights", "give either lora (a served name) or lora_weights, not both")
        self.engine.check_request(request)
        started = time.perf_counter()
        # Held from download to result: the cache evicts no LoRA a queued or rendering request uses.
        held: contextlib.AbstractAsyncContextManager[CachedLora | None] = (
            self.lora_cache.use(lora_weights, token) if lora_weights else contextlib.nullcontext()
        )
        async with held as cached:
            if cached is not None:
                print(f"lora_weights: {cached.shown}: {cached.info.describe()}")
                for note in self.engine.lora_warnings(cached.info):
                    print(f"warning: {note}")
                request = dataclasses.replace(request, lora=cached.name)
            done = await self.batcher.submit(request)
        result = done.result
        print(f"rendered in a batch of {done.batch_images} image(s) after {done.queue_wait_s:.2f}s in the queue")
        for note in warnings(result, self.engine.is_smoke, self.engine.weights.is_demo):
            print(f"warning: {note}")
        for index, image in enumerate(result.images):
            print(f"out-{index}: {describe(image)}")
        encoded = await asyncio.to_thread(encode_images, result.images, request.output_format, request.return_sprites)
        folder = self._new_output_folder()

        def save(name: str, data: bytes) -> Path:
            path = folder / f"{name}.{request.output_format}"
            path.write_bytes(data)
            return Path(path)

        stems = [output_stem(index, item.seed) for index, item in enumerate(encoded)]
        outputs = [save(stem, item.image) for stem, item in zip(stems, encoded, strict=True)]
        outputs += [
            save(f"{stem}-sprite", item.sprite) for stem, item in zip(stems, encoded, strict=True) if item.sprite
        ]
        outputs += [
            save(f"{stem}-smooth", item.smooth) for stem, item in zip(stems, encoded, strict=True) if item.smooth
        ]
        self.record_metric("seeds", [image.seed for image in result.images])
        self.record_metric("pixel_art", [image.art.quality.is_pixel_art for image in result.images])
        self.record_metric("batch_images", done.batch_images)
        print(f"generated {len(result.images)} image(s), {result.steps} steps, in {time.perf_counter() - started:.1f}s")
        return outputs

    async def _read_image(self, url: str) -> Image.Image:
        """The `image` input fetched or decoded (service/weights/inputs.py), then decoded and checked
        (service/images.py), off the event loop: RequestError naming `image` otherwise."""
        return await asyncio.to_thread(decode_image, await fetch_input(url, "image", self.image_policy), "image")

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


# Typed as run() declares its inputs; at run time a float can arrive where it says int (see the docstring).
@overload
def _whole(value: int) -> int: ...
@overload
def _whole(value: int | None) -> int | None: ...
def _whole(value: int | float | None) -> int | float | None:
    """Cog's schema lets a whole-number float such as 5.0 through for an integer input: take it as the integer.
    Any other float stays a float, which GenerationRequest.check refuses naming the field."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
