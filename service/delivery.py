"""The one delivery path every surface shares: a GenerationResult becomes encoded files and a JSON summary.

The encoding options live here and nowhere else, so the same request gives the same bytes from the CLI, the
HTTP API and the Cog runner (tests/test_predict.py compares them). Both formats are lossless: a lossy codec
would smear the flat cells the snapper made.
"""

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from service.config import OutputFormat
from service.engine import GeneratedImage, GenerationResult
from service.weights.resolve import DEMO_NOTE

MEDIA_TYPES: dict[OutputFormat, str] = {"png": "image/png", "webp": "image/webp"}
# PNG: zlib level 1, no `optimize` pass. The upscale is an indexed image of flat blocks already: level 1 encodes
# it faster than the default level (H200 hosts: 2.3 ms, 2.6-5.5 ms at the default level,
# bench/results/2026-12-02-NVIDIA-H200.json) into somewhat larger files; optimize would only spend time. WebP:
# lossless at its default effort.
ENCODER_OPTIONS: dict[OutputFormat, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {"compress_level": 1}),
    "webp": ("WEBP", {"lossless": True}),
}


def encode(image: Image.Image, output_format: OutputFormat) -> bytes:
    pil_format, options = ENCODER_OPTIONS[output_format]
    buffer = io.BytesIO()
    image.save(buffer, pil_format, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedImage:
    """One delivered portrait: its files' bytes and what the JSON says about it."""

    seed: int
    image: bytes  # the upscaled portrait
    sprite: bytes | None  # the grid x grid sprite, when asked for
    smooth: bytes | None  # the Real-ESRGAN upscale, with upscaler "realesrgan"
    summary: dict[str, Any]  # seed, palette, quality


def encode_images(images: list[GeneratedImage], output_format: OutputFormat, sprites: bool) -> list[EncodedImage]:
    """`sprites`: also each grid x grid sprite, and in the summary its background mask (when one was found)."""
    return [
        EncodedImage(
            seed=image.seed,
            image=encode(image.art.image, output_format),
            sprite=encode(image.art.sprite, output_format) if sprites else None,
            smooth=encode(image.smooth, output_format) if image.smooth is not None else None,
            summary=image_summary(image, with_mask=sprites),
        )
        for image in images
    ]


def image_summary(image: GeneratedImage, with_mask: bool = False) -> dict[str, Any]:
    """Seed, delivered palette, quality signals; with a `background` control, the count of the cells taken as
    background (null with "keep"), and `with_mask` the mask itself: one string of 0 and 1 per sprite row."""
    mask = image.art.background
    summary: dict[str, Any] = {
        "seed": image.seed,
        "palette": image.art.palette,
        "quality": image.art.quality.as_dict(),
        "background_cells": int(mask.sum()) if mask is not None else None,
    }
    if with_mask and mask is not None:
        summary["background_mask"] = ["".join("1" if cell else "0" for cell in row) for row in mask]
    return summary


def summary(result: GenerationResult) -> dict[str, Any]:
    """JSON-ready description of a result, everything but the pixels (the HTTP response and the CLI's .json)."""
    return {
        "prompt": result.prompt,
        "negative_prompt": result.negative_prompt,
        "truncated": bool(result.dropped_words),
        "dropped_words": result.dropped_words,
        "num_inference_steps": result.steps,
        "guidance_scale": result.guidance,
        "sampler": result.sampler,
        "images": [image_summary(image) for image in result.images],
        "timings": result.timings,
    }


def describe(image: GeneratedImage) -> str:
    """One line per image for logs and terminals: its seed and the pixel-art verdict with its signals."""
    q = image.art.quality
    verdict = "pixel art" if q.is_pixel_art else "NOT pixel art"
    return (
        f"seed {image.seed}: {verdict} (grid fit {q.grid_fit:.2f}, edge alignment {q.edge_alignment:.2f}, "
        f"{q.palette_size} colours)"
    )


def warnings(result: GenerationResult, is_smoke: bool, is_demo: bool = False) -> list[str]:
    """What a person should be told about a result beside the images."""
    notes = []
    if result.dropped_words:
        notes.append(f"prompt too long for CLIP, dropped: {result.dropped_words!r}")
    if is_smoke:
        notes.append("made with the random SMOKE model (no real weights found): the images are not meaningful")
    if is_demo:
        notes.append(f"made with the {DEMO_NOTE}")
    return notes
