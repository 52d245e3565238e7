"""Variations of an existing image (img2img): the input checks at the door (service/images.py) and the engine's
img2img pipeline built from its loaded components, on the smoke model."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from service import config
from service.engine import GenerationRequest
from service.errors import RequestError
from service.images import decode_base64_image, decode_image, initial_image
from service.loading import OneDeviceImg2ImgPipeline
from tests.test_engine import count_pipeline_calls
from train import sprites


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def sprite() -> Image.Image:
    return Image.fromarray(sprites.render(sprites.random_punk(np.random.default_rng(2))))


def animated() -> bytes:
    frames = [Image.new("RGB", (24, 24), colour) for colour in ("red", "blue")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


BAD_IMAGES = {
    "not an image": (lambda: b"GIF89a but not really", "not a complete image"),
    "truncated": (lambda: encoded(sprite().resize((256, 256)))[:-200], "not a complete image"),
    "animated": (animated, "still image"),
    "CMYK": (lambda: encoded(Image.new("CMYK", (32, 32)), "JPEG"), "not CMYK"),
    "16-bit": (lambda: encoded(Image.new("I;16", (32, 32))), "8 bits per channel"),
    "over the side cap": (lambda: encoded(Image.new("1", (config.MAX_IMAGE_SIDE + 1, 8))), "px a side"),
    "decompression bomb": (
        lambda: encoded(Image.new("1", (8 * config.MAX_IMAGE_SIDE, 8 * config.MAX_IMAGE_SIDE))),
        "px",
    ),
    "over the byte cap": (lambda: b"\x89PNG" + bytes(config.MAX_IMAGE_BYTES), "at most"),
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_images_are_refused_naming_the_field_and_never_echoed(name):
    make, why = BAD_IMAGES[name]
    data = make()
    with pytest.raises(RequestError, match=why) as error:
        decode_image(data, "init_images")
    assert error.value.field == "init_images"
    assert repr(data[:16])[2:-1] not in str(error.value)


def test_pillow_s_decompression_bomb_limit_is_set_explicitly():
    assert Image.MAX_IMAGE_PIXELS == config.MAX_IMAGE_SIDE**2


def test_images_that_are_accepted_and_the_start_picture_made_of_them():
    punk = sprite()
    assert np.array_equal(np.asarray(decode_image(encoded(punk))), np.asarray(punk))
    transparent = punk.convert("RGBA")
    transparent.putpixel((0, 0), (0, 0, 0, 0))
    assert decode_image(encoded(transparent)).getpixel((0, 0)) == (255, 255, 255)  # flattened onto white
    data_url = "data:image/png;base64," + __import__("base64").b64encode(encoded(punk)).decode()
    assert decode_base64_image(data_url).size == (24, 24)
    with pytest.raises(RequestError, match="base64"):
        decode_base64_image("not base64!")
    start = np.asarray(initial_image(punk, 512, 24))
    assert start.shape == (512, 512, 3)
    widths = np.diff(np.flatnonzero(np.any(start[0, 1:] != start[0, :-1], axis=-1)))
    assert set(widths) <= {21, 22, 42, 43, 64, 85}  # runs of 21/22 px cells (neighbours may share a colour)
    assert start[0, 0].tolist() == list(np.asarray(punk)[0, 0])
    assert initial_image(Image.new("RGB", (300, 200)), 512, 24).size == (512, 512)


@pytest.mark.parametrize(
    "changes, field, why",
    [
        ({"strength": 0.5}, "strength", "give an image"),
        ({"image": "x.png"}, "image", "must be an image"),
        ({"image": Image.new("RGB", (24, 24)), "strength": math.nan}, "strength", "between"),
        ({"image": Image.new("RGB", (24, 24)), "strength": 1.5}, "strength", "between"),
        ({"image": Image.new("RGB", (24, 24)), "strength": True}, "strength", "number"),
    ],
)
def test_bad_strengths_name_the_field(changes, field, why):
    with pytest.raises(RequestError, match=why) as error:
        GenerationRequest("punk", **changes).check()
    assert error.value.field == field


def test_a_strength_that_runs_no_step_is_refused(engine):
    with pytest.raises(RequestError, match="leaves no step to run") as error:
        engine.check_request(GenerationRequest("punk", image=sprite(), strength=0.2, num_inference_steps=4))
    assert error.value.field == "strength"


def test_variations_share_one_img2img_call_over_the_loaded_modules_and_match_alone(engine, monkeypatch):
    text_calls = count_pipeline_calls(engine.pipe, monkeypatch)
    built: list[OneDeviceImg2ImgPipeline] = []
    original_call = OneDeviceImg2ImgPipeline.__call__

    def counting(self, **kwargs):
        built.append(self)
        return original_call(self, **kwargs)

    monkeypatch.setattr(OneDeviceImg2ImgPipeline, "__call__", counting)
    start = sprite()
    alone = engine.generate(GenerationRequest("punk", seed=4, image=start, strength=0.5, num_inference_steps=4))
    built.clear()
    text, first, second = engine.generate_batch(
        [
            GenerationRequest("punk", seed=9, num_inference_steps=4),
            GenerationRequest("punk", seed=4, image=start, strength=0.5, num_inference_steps=4),
            GenerationRequest(
                "punk", 6, 2, num_inference_steps=4, image=Image.new("RGB", (64, 48), "red"), strength=0.5
            ),
        ]
    )
    assert len(built) == 1 and len(text_calls) == 1  # the two variation requests in one call
    (pipe,) = built
    assert (
        pipe.unet is engine.pipe.unet and pipe.vae is engine.pipe.vae and pipe.text_encoder is engine.pipe.text_encoder
    )
    assert [image.seed for image in second.images] == [6, 7]
    # the same image alone and batched: the same sprite, the raw render within one 8-bit step
    assert np.array_equal(np.asarray(first.images[0].art.sprite), np.asarray(alone.images[0].art.sprite))
    assert np.abs(np.asarray(first.images[0].raw, int) - np.asarray(alone.images[0].raw, int)).max() <= 1
    assert first.steps == 4 and text.images[0].art.sprite.size == (24, 24)
