"""Request and response bodies of the HTTP API. The bounds are config's, shared with the CLI and Cog."""

import base64
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service import config
from service.config import MAX_SEED, OutputFormat
from service.delivery import EncodedImage, summary
from service.engine import GenerationRequest, GenerationResult
from service.images import decode_base64_image
from service.samplers import SamplerName
from service.sprite_controls import KEEP, PRESETS


class GenerateRequest(BaseModel):
    # strict: "7" is not a seed and "yes" is not a bool -- a client bug is answered, not guessed at.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=config.MAX_PROMPT_CHARS)
    ] = Field(description="Short description, e.g. 'lad with a red beanie, green background'.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random when omitted; image i uses seed + i.")
    num_outputs: int = Field(1, ge=1, le=config.MAX_IMAGES, description="Images to generate.")
    num_inference_steps: int | None = Field(
        None, ge=config.MIN_STEPS, le=config.MAX_STEPS, description="Denoising steps (default: PUNKS_STEPS)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=config.MIN_GUIDANCE,
        le=config.MAX_GUIDANCE,
        allow_inf_nan=False,
        description="Classifier-free guidance (default: PUNKS_GUIDANCE).",
    )
    negative_prompt: str | None = Field(
        None,
        max_length=config.MAX_PROMPT_CHARS,
        description="Words added to the fixed negative prompt (which stays), e.g. 'hat, glasses'.",
    )
    sampler: SamplerName | None = Field(
        None, description="Sampler, by its A1111 name (default: PUNKS_SCHEDULER's, 'DPM++ 2M')."
    )
    output_size: int | None = Field(
        None,
        ge=config.MIN_OUTPUT_SIZE,
        le=config.MAX_OUTPUT_SIZE,
        description="Side of each delivered image in px (default: PUNKS_OUTPUT_SIZE, 1024).",
    )
    integer_scale: bool | None = Field(
        None,
        description="Cells of exactly floor(output_size / 24) px; the image is then a little smaller "
        "(1008 px for 1024). Default: PUNKS_INTEGER_SCALE.",
    )
    output_format: OutputFormat = Field("png", description="Encoding of the returned images (WebP is lossless).")
    return_sprites: bool = Field(False, description="Also return each grid x grid sprite.")
    lora: str | None = Field(
        None,
        max_length=200,
        description="A LoRA name from GET /v1/loras (files in PUNKS_LORAS_DIR); default: the served one.",
    )
    lora_scale: float | None = Field(
        None,
        ge=config.MIN_LORA_SCALE,
        le=config.MAX_LORA_SCALE,
        allow_inf_nan=False,
        description="Strength of the LoRA (default: PUNKS_LORA_SCALE); other scales need a server that can switch "
        "LoRAs (PUNKS_LORA_URL_CACHE_SIZE > 0 or a LoRA folder).",
    )
    upscaler: config.UpscalerName | None = Field(
        None, description="'realesrgan' also returns the raw generation upscaled smoothly (when the server enables it)."
    )
    # pixel-art controls (service/sprite_controls.py)
    palette: (
        Annotated[str, StringConstraints(max_length=50)] | list[Annotated[str, StringConstraints(max_length=20)]] | None
    ) = Field(
        None,
        description=f"Every cell takes one of these colours: a preset ({', '.join(PRESETS)}) or up to "
        f"{config.MAX_PALETTE_COLORS} '#rrggbb' codes; distinct sprite colours stay distinct while it has room.",
    )
    background: str = Field(
        KEEP,
        max_length=20,
        description="'keep', 'transparent' (RGBA output, alpha 0 on the border-connected background) or a '#rrggbb' "
        "to recolour it. The images report background_cells (and background_mask with return_sprites).",
    )
    # variations of an existing image (img2img)
    image: str | None = Field(
        None,
        max_length=config.MAX_IMAGE_BYTES * 4 // 3 + 100,
        description="Base64 (or a data: URL) of a PNG, JPEG or WebP to make variations of: a 24x24 sprite, or any "
        f"image up to {config.MAX_IMAGE_SIDE} px a side and {config.MAX_IMAGE_BYTES} bytes.",
    )
    strength: float | None = Field(
        None,
        ge=config.MIN_STRENGTH,
        le=config.MAX_STRENGTH,
        allow_inf_nan=False,
        description=f"How far a variation may move from the image (0-1; default {config.DEFAULT_STRENGTH}): the share "
        "of the steps run from it.",
    )

    def to_engine(self) -> GenerationRequest:
        """The engine's request; the image decoded and checked (RequestError naming `image`)."""
        fields = self.model_dump()
        fields["palette"] = tuple(self.palette) if isinstance(self.palette, list) else self.palette
        fields["image"] = decode_base64_image(self.image) if self.image is not None else None
        return GenerationRequest(**fields)


class Quality(BaseModel):
    grid_fit: float = Field(description="0..1: share of the image's variance explained by flat cells.")
    palette_size: int = Field(description="Colours in the cleaned sprite.")
    is_pixel_art: bool = Field(description="The verdict combining the signals.")
    edge_alignment: float = Field(description="0..1: share of edge energy on the grid lines.")


class ImageOut(BaseModel):
    seed: int
    image: str = Field(description="Base64 of the upscaled image.")
    sprite: str | None = Field(None, description="Base64 of the grid x grid sprite, when return_sprites.")
    smooth: str | None = Field(None, description="Base64 of the Real-ESRGAN upscale, when upscaler='realesrgan'.")
    palette: list[str] = Field(description="'#rrggbb', most frequent first (of the opaque cells).")
    quality: Quality
    background_cells: int | None = Field(
        None, description="Cells taken as background (with background 'transparent' or a colour; else null)."
    )
    background_mask: list[str] | None = Field(
        None, description="With return_sprites and a background control: one string of 0/1 per sprite row."
    )


class Timings(BaseModel):
    queue_wait_s: float = Field(description="Time waiting for the GPU.")
    pipeline_s: float = Field(description="Diffusion time of the batch this request was part of.")
    postprocess_s: float = Field(description="Snapping and nearest-neighbour upscaling of this request's images.")
    encode_s: float = Field(description="Encoding this response's images.")
    total_s: float = Field(description="From the request arriving to the response being ready.")


class GenerateResponse(BaseModel):
    prompt: str = Field(description="The templated prompt actually encoded.")
    negative_prompt: str
    truncated: bool = Field(description="Whether the prompt was too long for CLIP.")
    dropped_words: str = Field(description="The end of the prompt that did not fit ('' if none).")
    num_inference_steps: int
    guidance_scale: float
    sampler: str = Field(description="The sampler used, by its A1111 name.")
    media_type: str = Field(description="Of the images (and sprites), e.g. 'image/png'.")
    images: list[ImageOut]
    timings: Timings

    @classmethod
    def from_delivery(
        cls, result: GenerationResult, media_type: str, images: list[EncodedImage], timings: Timings
    ) -> "GenerateResponse":
        """The engine's summary (service/delivery.py) plus the encoded files, in base64."""
        return cls.model_validate(
            summary(result)
            | {
                "media_type": media_type,
                "images": [
                    image.summary
                    | {"image": _b64(image.image), "sprite": _b64(image.sprite), "smooth": _b64(image.smooth)}
                    for image in images
                ],
                "timings": timings,
            }
        )


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data is not None else None
