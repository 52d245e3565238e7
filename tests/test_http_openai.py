"""OpenAI's Images API (service/http/openai_images.py) driven by the official `openai` client from PyPI, against
real uvicorn servers on loopback over the smoke model (tests/live_server.py)."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from service.config import Settings
from service.engine import Engine
from tests.live_server import SpyEngine, make_app, post, thread_server, wait_queued

PROMPT = "lad with a red beanie, green background"


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=180)


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def test_generate_gives_1024_pngs_with_the_templated_prompt_and_seeds(live: str):
    result = client(live).images.generate(
        model="bespoke-punks",
        prompt=PROMPT,
        n=2,
        size="1024x1024",
        response_format="b64_json",
        user="someone",
        extra_body={"seed": 7},
    )
    assert result.created > 0 and len(result.data) == 2
    for offset, image in enumerate(result.data):
        assert image.b64_json is not None and png(image.b64_json).size == (1024, 1024)
        assert image.revised_prompt is not None and image.revised_prompt.startswith("pixel art, 24x24")
        assert "red beanie" in image.revised_prompt
        assert image.model_extra is not None and image.model_extra["seed"] == 7 + offset


def test_same_request_gives_the_same_png_bytes_as_v1_generate(live: str):
    result = client(live).images.generate(prompt=PROMPT, extra_body={"seed": 3})  # defaults: 1 image, 1024, b64
    native = post(live, {"prompt": PROMPT, "seed": 3, "output_size": 1024, "integer_scale": False})
    assert native.status_code == 200, native.text
    assert result.data[0].b64_json == native.json()["images"][0]["image"]


def test_models_lists_the_default(live: str):
    api = client(live)
    assert [model.id for model in api.models.list()] == ["bespoke-punks"]
    assert api.models.retrieve("bespoke-punks").id == "bespoke-punks"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("dall-e-3")


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"size": "512x512"}, "size"),
        ({"size": "1792x1024"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"model": "dall-e-3"}, "model"),
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"background": "clear"}, "background"),
        ({"extra_body": {"seed": -1}}, "seed"),
        ({"extra_body": {"seed": "7"}}, "seed"),
        ({"extra_body": {"steps": 30}}, "steps"),  # unknown parameter
    ],
)
def test_refused_arguments_raise_bad_request_naming_the_parameter(live: str, arguments: dict, param: str):
    with pytest.raises(openai.BadRequestError) as raised:
        client(live).images.generate(prompt=PROMPT, **arguments)
    error = raised.value
    assert error.status_code == 400 and error.param == param and param in error.message
    assert error.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"prompt": "lad", "n": NaN}', "n"),
        (b'{"prompt": "lad", "seed": Infinity}', "seed"),
        (b'{"prompt": "lad", "seed": 1e400}', "seed"),
        (b'{"prompt": "\\ud800"}', "prompt"),  # a lone surrogate
        (b'{"prompt": "lad", "\\udfff": 1}', None),  # ... as a parameter name: the body is not valid text
        (b'{"prompt": "   "}', "prompt"),
        (b'{"prompt": "' + b"x" * 501 + b'"}', "prompt"),
        (b'{"n": 1}', "prompt"),
        (b'{"prompt": 42}', "prompt"),
        (b'{"prompt": "lad",', None),
        (b'["lad"]', None),
        (b"", None),
    ],
)
def test_bad_bodies_are_400_in_openai_shape_never_500(live: str, content: bytes, param: str | None):
    response = httpx.post(
        f"{live}/v1/images/generations", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


def test_bearer_token_is_punks_api_token(smoke_settings: Settings, fast_engine: Engine):
    with thread_server(make_app(smoke_settings, lambda: fast_engine, api_token="s3cret")) as url:
        for key in ("wrong", "s3cretX"):
            with pytest.raises(openai.AuthenticationError) as raised:
                client(url, key).images.generate(prompt=PROMPT)
            assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                client(url, key).models.list()
        unauthorized = httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT})
        assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"
        result = client(url, "s3cret").images.generate(prompt=PROMPT, extra_body={"seed": 1})
        assert png(result.data[0].b64_json or "").size == (1024, 1024)


def test_full_queue_is_429_rate_limit_error(smoke_settings: Settings, fast_engine: Engine):
    spy = SpyEngine(fast_engine)
    spy.gate.clear()
    with thread_server(make_app(smoke_settings, lambda: spy, max_queue=1)) as url, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client(url).images.generate, prompt="running")
        assert spy.entered.wait(30)
        queued = pool.submit(client(url).images.generate, prompt="queued")
        wait_queued(url, 1)
        with pytest.raises(openai.RateLimitError) as raised:
            client(url).images.generate(prompt="one too many")
        assert raised.value.status_code == 429 and raised.value.code == "rate_limit_exceeded"
        assert int(raised.value.response.headers["retry-after"]) > 0
        spy.gate.set()
        assert len(running.result().data) == 1 and len(queued.result().data) == 1
