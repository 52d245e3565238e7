"""Request and response bodies of the HTTP API. The bounds are config's, shared with the CLI and Cog."""

import base64
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service import config
from service.config import MAX_SEED, OutputFormat
from service.delivery import EncodedImage, summary
from service.engine import GenerationRequest, GenerationResult
from service.samplers import SamplerName


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

    def to_engine(self) -> GenerationRequest:
        return GenerationRequest(**self.model_dump())


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
    palette: list[str] = Field(description="'#rrggbb', most frequent first.")
    quality: Quality


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
