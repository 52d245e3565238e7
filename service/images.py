"""Input images for variations (img2img): decoded and checked once, at the door of every surface, and made
into the picture the diffusion starts from.

Every refusal is a RequestError naming the surface's field, with a message that never repeats the input: not an
image, truncated, animated, CMYK or 16-bit, over MAX_IMAGE_BYTES or MAX_IMAGE_SIDE, or a decompression bomb
(Pillow's own limit is set here explicitly, to the square of MAX_IMAGE_SIDE, rather than left at its default).
"""

import base64
import binascii
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from service import config
from service.errors import RequestError
from service.pixelart import upscale

Image.MAX_IMAGE_PIXELS = config.MAX_IMAGE_SIDE**2  # larger is a DecompressionBombWarning (an error below)
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")  # 8 bits per channel or fewer, no CMYK, no float


def decode_image(data: bytes, field: str = "image") -> Image.Image:
    """The RGB image in `data` (a PNG, JPEG, WebP, GIF or BMP file), fully decoded; transparency is flattened onto
    white, as the snapper does. RequestError(field) for anything else."""
    if not isinstance(data, bytes | bytearray) or not data:
        raise RequestError(field, "must be an image file (PNG, JPEG, WebP)")
    if len(data) > config.MAX_IMAGE_BYTES:
        raise RequestError(field, f"at most {config.MAX_IMAGE_BYTES} bytes, got {len(data)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_header(image, field)
            image.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(field, f"larger than {config.MAX_IMAGE_SIDE}x{config.MAX_IMAGE_SIDE} px") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # not an image, truncated, corrupt
        raise RequestError(field, "is not a complete image file (PNG, JPEG, WebP)") from None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def read_image_file(path: Path, field: str = "image") -> Image.Image:
    """decode_image of a file (the CLI's --image), its size checked before it is read."""
    if not path.is_file() or path.stat().st_size > config.MAX_IMAGE_BYTES:
        raise RequestError(field, f"must be an image file of at most {config.MAX_IMAGE_BYTES} bytes")
    try:
        with path.open("rb") as file:
            data = file.read(config.MAX_IMAGE_BYTES + 1)  # a file may grow after its size was read
    except OSError as error:
        raise RequestError(field, f"could not be read ({error.strerror or type(error).__name__})") from None
    return decode_image(data, field)


def _check_header(image: Image.Image, field: str) -> None:
    width, height = image.size
    if max(width, height) > config.MAX_IMAGE_SIDE:
        raise RequestError(field, f"at most {config.MAX_IMAGE_SIDE} px a side, got {width}x{height}")
    if getattr(image, "n_frames", 1) > 1:
        raise RequestError(field, "must be a still image, not an animation")
    if image.mode not in MODES:
        raise RequestError(field, f"must be RGB or greyscale with 8 bits per channel, not {image.mode}")


def decode_base64_image(text: object, field: str = "image") -> Image.Image:
    """decode_image of base64 text, with or without a data: URL prefix (A1111 clients send both)."""
    if not isinstance(text, str):
        raise RequestError(field, "must be a base64-encoded image file")
    return decode_image(decode_base64(text, field, config.MAX_IMAGE_BYTES), field)


def decode_base64(text: str, field: str, max_bytes: int) -> bytes:
    """The bytes of base64 text, with or without a data: URL prefix, refused unread when they would pass
    `max_bytes`: the one decoder of every surface's base64 and data: URL inputs (Cog's `input_images` too)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > max_bytes * 4 // 3 + 4:
        raise RequestError(field, f"at most {max_bytes} bytes, got more")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64") from None


def initial_image(image: Image.Image, size: int, grid: int) -> Image.Image:
    """The size x size picture a variation starts from: a grid x grid sprite upscaled nearest into cells of 21 or
    22 px (size / grid at 512), as the training portraits were drawn; any other image centre-cropped to a square
    and resized."""
    if image.size == (grid, grid):
        return upscale(image.convert("RGB"), size).convert("RGB")
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
