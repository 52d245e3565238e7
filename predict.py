"""Cog runner for Replicate: a description in, 1024 px pixel-art portraits (and optionally their 24x24
sprites) out. Thin on purpose: parse the input, call the engine, encode the files.

Served by `python -m cog.server.http` (coglet) with COG_PREDICT_TYPE_STUB=predict.py:Runner; cog.yaml says
`run: "predict.py:Runner"`. Inputs are validated by coglet against .cog/openapi_schema.json, which
`cog build` writes and `python -m service.cog_schema` regenerates (committed, checked by the tests).

The numbers inside Input(...) are literals, not service.config constants, because `cog build`
derives the schema by *statically* parsing this file: it silently drops a bound it cannot read as a
literal (and an unreadable default makes the input required). tests/test_predict.py checks that every literal equals its service.config counterpart.

Not an input: the LoRA strength. The engine fuses the LoRA into the weights once at setup and drops
the adapter, so a per-request scale would mean reloading the model; set PUNKS_LORA_SCALE instead.
"""

import logging
import shutil
import tempfile
import time
from pathlib import Path as FsPath

from cog import BaseRunner, Input, Path

from service.config import Settings
from service.delivery import describe, encode_images, warnings
from service.engine import Engine, GenerationRequest
from service.weights.fetch import fetch_weights_from_env


class Runner(BaseRunner):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        settings = Settings()
        fetch_weights_from_env(settings.weights_dir)  # no-op unless PUNKS_WEIGHTS_URLS is set
        self.engine = Engine.load(settings)  # WeightsError names every missing file
        self._outputs = FsPath(tempfile.mkdtemp(prefix="punks-cog-"))

    def run(
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
            description="Also return each 24x24 sprite (one pixel per cell), after all the full-size images, in the same order.",
        ),
        output_format: str = Input(default="png", choices=["png", "webp"], description="Lossless PNG or lossless WebP."),
        lora: str = Input(default="", description="A LoRA name from weights/loras (empty: the served default LoRA)."),
        upscaler: str = Input(
            default="nearest",
            choices=["nearest", "realesrgan"],
            description="realesrgan also returns the raw generation upscaled smoothly (needs PUNKS_UPSCALER=realesrgan).",
        ),
    ) -> list[Path]:
        """The full-size images in seed order, then (with return_sprites) their sprites, then (with upscaler
        realesrgan) the smooth upscales, each in the same order."""
        # The schema rejects out-of-bounds values with a 422 before they get here; without it (or for what it
        # cannot say) GenerationRequest.check raises RequestError naming the field: a failed prediction.
        request = GenerationRequest(
            prompt=prompt, seed=seed, num_outputs=num_outputs, steps=steps, guidance=guidance, lora=lora or None,
            upscaler=upscaler, output_size=output_size, integer_scale=integer_scale,
            output_format=output_format, return_sprites=return_sprites,  # type: ignore[arg-type]  # schema: choices
        )
        started = time.perf_counter()
        result = self.engine.generate(request)
        for note in warnings(result, self.engine.is_smoke):
            print(f"warning: {note}")
        for index, image in enumerate(result.images, start=1):
            print(f"image {index}: {describe(image)}")
        encoded = encode_images(result.images, request.output_format, request.return_sprites)
        folder = self._new_output_folder()
        files = [(f"punk-{i}", item.image) for i, item in enumerate(encoded, start=1)]
        files += [(f"punk-{i}.sprite", item.sprite) for i, item in enumerate(encoded, start=1) if item.sprite]
        files += [(f"punk-{i}.smooth", item.smooth) for i, item in enumerate(encoded, start=1) if item.smooth]
        outputs = []
        for stem, data in files:
            path = folder / f"{stem}.{request.output_format}"
            path.write_bytes(data)
            outputs.append(Path(path))
        self.record_metric("seeds", [image.seed for image in result.images])
        self.record_metric("pixel_art", [image.art.quality.is_pixel_art for image in result.images])
        print(f"generated {len(result.images)} image(s), {result.steps} steps, in {time.perf_counter() - started:.1f}s")
        return outputs

    def _new_output_folder(self) -> FsPath:
        """One folder per prediction; the previous ones (already sent by now) are removed."""
        for old in self._outputs.iterdir():
            shutil.rmtree(old, ignore_errors=True)
        return FsPath(tempfile.mkdtemp(dir=self._outputs))
