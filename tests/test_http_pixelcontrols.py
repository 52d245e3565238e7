"""The pixel-art controls and variations through the real HTTP servers on loopback (uvicorn, the smoke model):
/v1/generate with httpx, /v1/images/variations with the `openai` client, /sdapi/v1/img2img with `webuiapi`."""

import base64
import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from service import config
from service.config import Settings
from service.engine import Engine
from service.sprite_controls import PRESETS, rgb_codes
from tests.live_server import FAST, TIMEOUT, make_app, post, thread_server
from train import sprites

PROMPT = "lad with a red beanie, green background"
STEPS = 4  # a variation at strength 0.5 runs 2 of them


@pytest.fixture(scope="module")
def server(engine, smoke_settings: Settings) -> Iterator[str]:
    settings = Settings(**smoke_settings.model_dump() | FAST | {"steps": STEPS})
    four_steps = Engine(engine.pipe, settings, engine.weights, engine.loras)
    with thread_server(make_app(smoke_settings, lambda: four_steps, steps=STEPS)) as url:
        yield url


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def sprite() -> Image.Image:
    return Image.fromarray(sprites.render(sprites.random_punk(np.random.default_rng(5))))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decoded(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGBA"))


def test_native_palette_and_transparent_background_reach_every_pixel_and_say_which_cells(server: str):
    body = {"prompt": PROMPT, "seed": 3, "palette": "pico-8", "background": "transparent", "return_sprites": True}
    answer = post(server, body)
    assert answer.status_code == 200, answer.text
    (image,) = answer.json()["images"]
    big, small = decoded(image["image"]), decoded(image["sprite"])
    mask = np.array([[cell == "1" for cell in row] for row in image["background_mask"]])
    assert mask.shape == (24, 24) and image["background_cells"] == int(mask.sum()) > 0
    assert np.array_equal(small[..., 3] == 0, mask)
    palette = {tuple(colour) for colour in rgb_codes(PRESETS["pico-8"]).tolist()}
    opaque = {tuple(pixel) for pixel in big[..., :3][big[..., 3] == 255].tolist()}
    assert opaque <= palette and set(np.unique(big[..., 3])) <= {0, 255}
    assert set(image["palette"]) <= set(PRESETS["pico-8"])

    recoloured = post(server, {"prompt": PROMPT, "seed": 3, "background": "#ff00ff"}).json()["images"][0]
    assert recoloured["background_cells"] == image["background_cells"] and recoloured["background_mask"] is None
    assert "#ff00ff" in recoloured["palette"]


def test_native_variation_of_a_sprite_is_seeded(server: str):
    body = {"prompt": PROMPT, "seed": 8, "image": b64(png_bytes(sprite())), "strength": 0.5, "num_outputs": 2}
    first, again = post(server, body), post(server, body)
    assert first.status_code == 200, first.text
    assert [image["seed"] for image in first.json()["images"]] == [8, 9]
    assert first.json()["images"] == again.json()["images"]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"palette": "gameboy"}, "palette"),
        ({"palette": ["#00000g"]}, "palette"),
        ({"palette": ["#000000"] * (config.MAX_PALETTE_COLORS + 1)}, "palette"),
        ({"background": "clear"}, "background"),
        ({"image": b64(b"not an image at all")}, "image"),
        ({"image": b64(png_bytes(sprite())[:-30])}, "image"),
        ({"image": "%%%"}, "image"),
        ({"image": b64(png_bytes(sprite())), "strength": 1.5}, "strength"),
        ({"strength": 0.5}, "strength"),
    ],
)
def test_native_bad_controls_are_422_naming_the_field_without_echo(server: str, changes: dict, field: str):
    answer = post(server, {"prompt": PROMPT} | changes)
    assert answer.status_code == 422, answer.text
    assert [item["loc"][-1] for item in answer.json()["detail"]][0] == field
    assert "not an image at all" not in answer.text and "%%%" not in answer.text


def test_a_strength_that_is_no_number_names_the_field(server: str):
    """JSON has no NaN (a body with one is invalid JSON); a form field may say nan."""
    for value in ("nan", "-0.1", "2"):
        form = httpx.post(
            f"{server}/v1/images/variations",
            files={"image": ("punk.png", png_bytes(sprite()), "image/png")},
            data={"strength": value},
            timeout=TIMEOUT,
        )
        assert form.status_code == 400 and form.json()["error"]["param"] == "strength", value


def test_openai_client_create_variation_returns_punks(server: str):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=180)
    result = client.images.create_variation(
        image=("punk.png", png_bytes(sprite()), "image/png"), n=2, extra_body={"seed": 4, "strength": 0.5}
    )
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) for item in result.data]
    assert [image.size for image in images] == [(1024, 1024)] * 2
    assert [item.model_extra["seed"] for item in result.data] == [4, 5]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.create_variation(image=("punk.png", b"GIF89a nonsense", "image/png"))
    assert refused.value.status_code == 400 and refused.value.body["param"] == "image"  # type: ignore[index]
    transparent = client.images.generate(prompt=PROMPT, background="transparent", extra_body={"seed": 2})
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(transparent.data[0].b64_json or ""))).convert("RGBA"))
    assert (pixels[..., 3] == 0).any()


def test_webuiapi_img2img_returns_punks_and_refuses_a_bad_image(server: str):
    port = int(server.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DPM++ 2M")
    result = api.img2img(images=[sprite()], prompt=PROMPT, denoising_strength=0.5, seed=6, steps=STEPS)
    assert [image.size for image in result.images] == [(512, 512)]
    assert result.info["seed"] == 6 and "init_images" not in result.parameters
    answer = httpx.post(
        f"{server}/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": ["data:image/png;base64,AAAA"]}
    )
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "init_images"]
    masked = {"prompt": PROMPT, "init_images": [b64(png_bytes(sprite()))], "mask": "x"}
    assert httpx.post(f"{server}/sdapi/v1/img2img", json=masked).json()["detail"][0]["loc"] == ["body", "mask"]


def test_an_image_body_may_be_larger_than_a_text_body(server: str):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8))
    data = png_bytes(noise)
    assert len(data) > Settings().max_body_bytes
    answer = post(server, {"prompt": PROMPT, "image": b64(data), "strength": 0.5, "num_inference_steps": STEPS})
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.text)["images"][0]["background_cells"] is None
