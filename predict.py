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
from PIL import Image

from service.config import MAX_IMAGES, Settings
from service.engine import Engine, GeneratedImage, GenerationRequest
from service.weights.fetch import fetch_weights_from_env
from service.pixelart import upscale

FORMATS = {"png": ("PNG", {"optimize": True}), "webp": ("WEBP", {"lossless": True, "quality": 100, "method": 6})}


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
        steps: int = Input(default=25, ge=1, le=100, description="Denoising steps."),
        guidance: float = Input(default=7.5, ge=0.0, le=20.0, description="Classifier-free guidance scale."),
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
        # Bad values raise ValueError naming the field (engine: GenerationRequest.check): coglet reports a
        # failed prediction with that message. The schema rejects them with a 422 before they get here.
        # The inputs named differently from the engine's are checked here, under their Cog names.
        if not 1 <= num_outputs <= MAX_IMAGES:
            raise ValueError(f"num_outputs: must be between 1 and {MAX_IMAGES}")
        if not 24 <= output_size <= 4096:
            raise ValueError("output_size: must be between 24 and 4096")
        if output_format not in FORMATS:
            raise ValueError(f"output_format: must be one of {', '.join(FORMATS)}")
        request = GenerationRequest(
            prompt=prompt, seed=seed, num_images=num_outputs, steps=steps, guidance=guidance,
            lora=lora or None, upscaler=upscaler,
        )

        started = time.perf_counter()
        result = self.engine.generate(request)
        if result.dropped_words:
            print(f"warning: prompt too long for CLIP, dropped: {result.dropped_words!r}")
        if self.engine.weights.is_smoke:
            print("warning: SMOKE MODEL (no real weights found): the images are random noise")

        folder = self._new_output_folder()
        images, sprites, smooth = [], [], []
        for index, image in enumerate(result.images, start=1):
            print(_describe(index, image))
            full_size = self._full_size(image, output_size, integer_scale)
            images.append(self._save(full_size, folder / f"punk-{index}", output_format))
            if return_sprites:
                sprites.append(self._save(image.art.sprite, folder / f"punk-{index}.sprite", output_format))
            if image.smooth is not None:
                smooth.append(self._save(image.smooth, folder / f"punk-{index}.smooth", output_format))
        self.record_metric("seeds", [image.seed for image in result.images])
        self.record_metric("pixel_art", [image.art.quality.is_pixel_art for image in result.images])
        print(f"generated {len(result.images)} image(s), {result.steps} steps, in {time.perf_counter() - started:.1f}s")
        return images + sprites + smooth

    def _full_size(self, image: GeneratedImage, size: int, integer_scale: bool) -> Image.Image:
        settings = self.engine.settings
        if (size, integer_scale) == (settings.output_size, settings.integer_scale):
            return image.art.image  # the engine already made this one
        return upscale(image.art.sprite, size=size, integer_scale=integer_scale)

    def _new_output_folder(self) -> FsPath:
        """One folder per prediction; the previous ones (already sent by now) are removed."""
        for old in self._outputs.iterdir():
            shutil.rmtree(old, ignore_errors=True)
        return FsPath(tempfile.mkdtemp(dir=self._outputs))

    @staticmethod
    def _save(image: Image.Image, stem: FsPath, output_format: str) -> Path:
        pil_format, options = FORMATS[output_format]
        path = stem.with_name(f"{stem.name}.{output_format}")
        image.save(path, pil_format, **options)
        return Path(path)


def _describe(index: int, image: GeneratedImage) -> str:
    """One log line per image: its seed and the pixel-art quality signals."""
    q = image.art.quality
    verdict = "pixel art" if q.is_pixel_art else "NOT pixel art"
    return (
        f"image {index}: seed {image.seed}: {verdict} (grid fit {q.grid_fit:.2f}, "
        f"edge alignment {q.edge_alignment:.2f}, {q.palette_size} colours)"
    )
