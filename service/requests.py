"""What a user can ask for (GenerationRequest) and its check against the shared bounds (service/config.py).

Torch-free: every surface builds and checks requests before anything heavy is imported. What only a loaded
engine can judge (is the LoRA served, is the upscaler loaded, does the prompt fit CLIP) is Engine.check_request.
"""

import unicodedata
from dataclasses import dataclass

from PIL import Image

from service import config, samplers
from service.errors import RequestError
from service.sprite_controls import KEEP, check_background, palette_colours


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a user can ask for, under the field names of the CLI, /v1/generate and Cog (Cog's `scheduler` is
    `sampler`; the OpenAI and A1111 routes map their own names). None means the configured default (Settings)."""

    prompt: str
    seed: int | None = None  # None: random; image i uses seed + i
    num_outputs: int = 1
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None  # added to the fixed negative prompt (service/prompts.py), never replacing it
    sampler: str | None = None  # an A1111 name or alias (service/samplers.py); None: PUNKS_SCHEDULER's
    lora: str | None = None  # a name from Engine.lora_names (a LoRA in loras_dir); None: the default LoRA
    lora_scale: float | None = None  # strength the LoRA is fused at; None: PUNKS_LORA_SCALE
    upscaler: config.UpscalerName | None = None  # "realesrgan": also GeneratedImage.smooth
    output_size: int | None = None  # side of the delivered image
    integer_scale: bool | None = None  # cells of exactly floor(output_size / grid) px
    output_format: config.OutputFormat = "png"  # delivery only (service/delivery.py)
    return_sprites: bool = False  # delivery only: also the grid x grid sprites (and the background masks)
    # pixel-art controls (service/sprite_controls.py)
    palette: str | tuple[str, ...] | None = None  # a preset's name or up to 64 '#rrggbb'; None: the snap's own
    background: str = KEEP  # "keep", "transparent" or a '#rrggbb' to recolour it
    # variations of an existing image (img2img)
    image: Image.Image | None = None  # decoded and checked at the door (service/images.py)
    strength: float | None = None  # share of the steps run from the image; None: DEFAULT_STRENGTH

    def check(self) -> None:
        """Raise RequestError naming the field for a value outside the shared bounds (service/config.py).

        Written for untrusted callers: a bool is not a number here, nor is NaN or a float seed."""
        _check_text("prompt", self.prompt, config.MAX_PROMPT_CHARS)
        if not any(unicodedata.category(char)[0] not in "CZ" for char in self.prompt):  # spaces, zero-width, controls
            raise RequestError("prompt", "must not be empty (it has no visible character)")
        if self.seed is not None:
            _check_number("seed", self.seed, 0, config.MAX_SEED, whole=True)
        _check_number("num_outputs", self.num_outputs, 1, config.MAX_IMAGES, whole=True)
        if self.num_inference_steps is not None:
            _check_number(
                "num_inference_steps", self.num_inference_steps, config.MIN_STEPS, config.MAX_STEPS, whole=True
            )
        if self.guidance_scale is not None:
            _check_number("guidance_scale", self.guidance_scale, config.MIN_GUIDANCE, config.MAX_GUIDANCE)
        if self.negative_prompt is not None:
            _check_text("negative_prompt", self.negative_prompt, config.MAX_PROMPT_CHARS)
        if self.sampler is not None:
            samplers.lookup(self.sampler)
        if self.output_size is not None:
            _check_number("output_size", self.output_size, config.MIN_OUTPUT_SIZE, config.MAX_OUTPUT_SIZE, whole=True)
        if self.lora is not None:
            _check_text("lora", self.lora, 200)
            if not self.lora.strip():
                raise RequestError("lora", "must be a LoRA name (a file stem in the LoRA folder)")
        if self.lora_scale is not None:
            _check_number("lora_scale", self.lora_scale, config.MIN_LORA_SCALE, config.MAX_LORA_SCALE)
        _check_choice("upscaler", self.upscaler, config.UPSCALERS, optional=True)
        _check_choice("output_format", self.output_format, config.OUTPUT_FORMATS)
        if self.integer_scale is not None:
            _check_flag("integer_scale", self.integer_scale)
        _check_flag("return_sprites", self.return_sprites)
        if self.palette is not None:
            palette_colours(self.palette)
        check_background(self.background)
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise RequestError("image", "must be an image")
        if self.strength is not None:
            _check_number("strength", self.strength, config.MIN_STRENGTH, config.MAX_STRENGTH)
            if self.image is None:
                raise RequestError("strength", "applies to a variation: give an image too")


def request_sizes(images: int) -> list[int]:
    """Image counts of the fewest requests that fill a batch of `images`: a batch beyond one request's
    MAX_IMAGES is several requests grouped, as the batcher groups them."""
    full, rest = divmod(images, config.MAX_IMAGES)
    return [config.MAX_IMAGES] * full + ([rest] if rest else [])


def _check_text(field: str, value: object, max_chars: int) -> None:
    if not isinstance(value, str):
        raise RequestError(field, "must be a string")
    if len(value) > max_chars:
        raise RequestError(field, f"at most {max_chars} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(field, "must be valid Unicode text (no lone surrogates)") from None


def _check_number(field: str, value: object, low: float, high: float, whole: bool = False) -> None:
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(field, "must be a whole number" if whole else "must be a number")
    if not low <= value <= high:  # also refuses NaN
        raise RequestError(field, f"must be between {low} and {high}")


def _check_flag(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise RequestError(field, "must be true or false")


def _check_choice(field: str, value: object, choices: tuple[str, ...], optional: bool = False) -> None:
    if (value is None and optional) or value in choices:
        return
    raise RequestError(field, f"must be one of {', '.join(choices)}")
