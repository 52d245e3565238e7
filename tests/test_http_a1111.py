"""AUTOMATIC1111's txt2img API (service/http/a1111.py) driven by the `webuiapi` client from PyPI, against real
uvicorn servers on loopback over the smoke model (tests/live_server.py)."""

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import webuiapi

from service import samplers
from service.config import MAX_SEED, Settings
from service.engine import Engine
from tests.live_server import SpyEngine, make_app, post, thread_server, wait_queued

PROMPT = "lad with a red beanie, green background"
SAMPLER = "DPM++ 2M"  # PUNKS_SCHEDULER's default, dpm++


def client(url: str, **auth: str) -> webuiapi.WebUIApi:
    port = int(url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler=SAMPLER, **auth)


def test_txt2img_gives_images_and_info_with_the_seeds(live: str):
    result = client(live).txt2img(prompt=PROMPT, seed=7, batch_size=2, steps=1, cfg_scale=6.5)
    assert [image.size for image in result.images] == [(512, 512)] * 2  # width/height: A1111's default 512
    assert result.info["seed"] == 7 and result.info["all_seeds"] == [7, 8]
    assert result.info["prompt"].startswith("pixel art, 24x24") and "red beanie" in result.info["prompt"]
    assert result.info["sampler_name"] == SAMPLER and result.info["steps"] == 1 and result.info["cfg_scale"] == 6.5
    assert "Seed: 8" in result.info["infotexts"][1]
    assert result.parameters["prompt"] == PROMPT and result.parameters["seed"] == 7


def test_seed_minus_one_is_random_and_a_given_seed_reproduces(live: str):
    api = client(live)
    first, second = (api.txt2img(prompt=PROMPT, seed=-1) for _ in range(2))
    seeds = [first.info["seed"], second.info["seed"]]
    assert all(0 <= seed <= MAX_SEED for seed in seeds) and seeds[0] != seeds[1]
    again = api.txt2img(prompt=PROMPT, seed=seeds[0])
    assert again.info["seed"] == seeds[0] and again.json["images"] == first.json["images"]


def test_batch_and_iterations_multiply(live: str):
    result = client(live).txt2img(prompt=PROMPT, seed=11, batch_size=2, n_iter=2)
    assert len(result.images) == 4 and result.info["all_seeds"] == [11, 12, 13, 14]


def test_width_1024_gives_the_same_png_bytes_as_v1_generate(live: str):
    result = client(live).txt2img(prompt=PROMPT, seed=3, steps=1, cfg_scale=7.0, width=1024, height=1024)
    native = post(
        live, {"prompt": PROMPT, "seed": 3, "num_inference_steps": 1, "guidance_scale": 7.0, "output_size": 1024}
    )
    assert result.json["images"][0] == native.json()["images"][0]["image"]


def test_listings_clients_read_at_start(live: str):
    api = client(live)
    listed = api.get_samplers()
    assert [sampler["name"] for sampler in listed] == list(samplers.SAMPLER_NAMES)
    assert {"name": "Euler a", "aliases": ["k_euler_a", "k_euler_ancestral"], "options": {}} in listed
    assert {"name": "PNDM", "aliases": ["PLMS", "plms", "pndm"], "options": {}} in listed
    assert [schedule["label"] for schedule in api.get_schedulers()] == ["Automatic", "Karras"]
    assert [model["title"] for model in api.get_sd_models()] == ["bespoke-punks"]
    assert api.get_options()["sd_model_checkpoint"] == "bespoke-punks"
    assert api.get_scripts() == {"txt2img": [], "img2img": []}


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"sampler_name": "DPM fast"}, "sampler_name"),  # not served
        ({"sampler_name": "", "sampler_index": "DPM2 a"}, "sampler_index"),
        ({"sampler_name": "Euler a", "scheduler": "karras"}, "scheduler"),  # no Karras variant served
        ({"scheduler": "exponential"}, "scheduler"),
        ({"negative_prompt": "x" * 501}, "negative_prompt"),
        ({"batch_size": 3, "n_iter": 2}, "n_iter"),
        ({"batch_size": 5}, "batch_size"),
        ({"width": 512, "height": 768}, "height"),
        ({"width": 8}, "width"),
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"subseed_strength": 0.5}, "subseed_strength"),
        ({"seed": -2}, "seed"),
        ({"steps": 0}, "steps"),
        ({"cfg_scale": 30}, "cfg_scale"),
        ({"prompt": "   "}, "prompt"),
        ({"override_settings": {"sd_model_checkpoint": "v1-5-pruned"}}, "override_settings"),
    ],
)
def test_refused_arguments_are_422_naming_the_field(live: str, arguments: dict, field: str):
    arguments = {"prompt": PROMPT} | arguments
    with pytest.raises(RuntimeError) as raised:
        client(live).txt2img(**arguments)
    status, text = raised.value.args
    assert status == 422, text
    assert ["body", field] in [error["loc"][:2] for error in httpx.Response(422, content=text).json()["detail"]]


def test_webuiapis_default_call_returns_images_with_its_default_sampler(live: str):
    port = int(live.rsplit(":", 1)[1])
    result = webuiapi.WebUIApi("127.0.0.1", port).txt2img(prompt="punk with a beanie", seed=11, steps=2, cfg_scale=7)
    assert len(result.images) == 1 and result.images[0].size == (512, 512)
    assert result.info["sampler_name"] == "Euler a" and result.info["scheduler"] == "Automatic"  # webuiapi's default
    assert "Sampler: Euler a, Schedule type: Automatic," in result.info["infotexts"][0]
    native = post(
        live,
        {
            "prompt": "punk with a beanie",
            "seed": 11,
            "num_inference_steps": 2,
            "guidance_scale": 7,
            "sampler": "Euler a",
            "output_size": 512,
        },
    )
    assert result.json["images"][0] == native.json()["images"][0]["image"]


def test_sampler_aliases_and_the_karras_scheduler_name_the_sampler_used(live: str):
    api = client(live)
    karras = api.txt2img(prompt=PROMPT, seed=5, steps=2, sampler_name="DPM++ 2M", scheduler="Karras")
    assert karras.info["sampler_name"] == "DPM++ 2M Karras" and karras.info["scheduler"] == "Karras"
    assert "Sampler: DPM++ 2M Karras, Schedule type: Karras," in karras.info["infotexts"][0]
    named = api.txt2img(prompt=PROMPT, seed=5, steps=2, sampler_name="k_dpmpp_2m_ka", scheduler="automatic")
    assert named.info["sampler_name"] == "DPM++ 2M Karras" and named.json["images"] == karras.json["images"]
    plain = api.txt2img(prompt=PROMPT, seed=5, steps=2, sampler_name="DPM++ 2M")
    assert plain.info["sampler_name"] == "DPM++ 2M" and plain.json["images"] != karras.json["images"]
    plms = api.txt2img(prompt=PROMPT, seed=5, steps=2, sampler_name="PLMS")
    assert plms.info["sampler_name"] == "PNDM" and plms.parameters["sampler_name"] == "PNDM"


def test_unknown_sampler_lists_the_accepted_names(live: str):
    port = int(live.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError) as raised:
        webuiapi.WebUIApi(port=port, sampler="DPM fast").txt2img(prompt=PROMPT)
    assert raised.value.args[0] == 422
    assert all(name in raised.value.args[1] for name in samplers.SAMPLER_NAMES)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b'{"prompt": "lad", "cfg_scale": NaN}', "cfg_scale"),
        (b'{"prompt": "lad", "cfg_scale": Infinity}', "cfg_scale"),
        (b'{"prompt": "lad", "seed": 1e400}', "seed"),
        (b'{"prompt": "lad", "subseed_strength": -Infinity}', "subseed_strength"),
        (b'{"prompt": "\\ud800"}', "prompt"),  # a lone surrogate
        (b'{"prompt": "lad", "negative_prompt": "\\udfff"}', "negative_prompt"),
        (b'{"prompt": "' + b"x" * 501 + b'"}', "prompt"),
        (b'{"prompt": ["lad"]}', "prompt"),
        (b'{"prompt": "lad",', None),
        (b"", None),
    ],
)
def test_bad_bodies_are_422_never_500(live: str, content: bytes, field: str | None):
    response = httpx.post(f"{live}/sdapi/v1/txt2img", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    locs = [error["loc"] for error in response.json()["detail"]]
    assert field is None or ["body", field] in [loc[:2] for loc in locs]


def test_unknown_fields_are_ignored_and_a_nan_in_one_is_harmless(live: str):
    body = b'{"prompt": "lad", "seed": 1, "steps": 1, "eta": NaN, "hr_prompt": "\\ud800", "alwayson_scripts": {}}'
    response = httpx.post(f"{live}/sdapi/v1/txt2img", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 1


def test_token_as_bearer_or_basic_password(smoke_settings: Settings, fast_engine: Engine):
    with thread_server(make_app(smoke_settings, lambda: fast_engine, api_token="s3cret")) as url:
        for api in (client(url), client(url, username="me", password="wrong")):
            with pytest.raises(RuntimeError) as raised:
                api.txt2img(prompt=PROMPT, seed=1)
            assert raised.value.args[0] == 401
        listing = httpx.get(f"{url}/sdapi/v1/sd-models")
        assert listing.status_code == 401 and listing.json()["error"] == "HTTPException"
        basic = client(url, username="anyone", password="s3cret")  # webuiapi's set_auth: A1111's --api-auth
        assert basic.txt2img(prompt=PROMPT, seed=1).info["seed"] == 1
        bearer = client(url)
        bearer.session.headers["Authorization"] = "Bearer s3cret"
        assert bearer.txt2img(prompt=PROMPT, seed=2).info["seed"] == 2


def test_full_queue_is_429(smoke_settings: Settings, fast_engine: Engine):
    spy = SpyEngine(fast_engine)
    spy.gate.clear()
    with thread_server(make_app(smoke_settings, lambda: spy, max_queue=1)) as url, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client(url).txt2img, prompt="running")
        assert spy.entered.wait(30)
        queued = pool.submit(client(url).txt2img, prompt="queued")
        wait_queued(url, 1)
        rejected = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "one too many"})
        assert rejected.status_code == 429 and int(rejected.headers["retry-after"]) > 0
        assert rejected.json() | {"errors": ""} == {
            "error": "HTTPException",
            "detail": "too many queued requests",
            "body": "",
            "errors": "",
        }
        with pytest.raises(RuntimeError) as raised:
            client(url).txt2img(prompt="one too many")
        assert raised.value.args[0] == 429
        spy.gate.set()
        assert len(running.result().images) == 1 and len(queued.result().images) == 1


def test_png_images_decode(live: str):
    result = client(live).txt2img(prompt=PROMPT, seed=5)
    assert base64.b64decode(result.json["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_negative_prompt_is_added_to_the_fixed_one(live: str):
    from service.prompts import NEGATIVE_PROMPT

    plain = client(live).txt2img(prompt=PROMPT, seed=5, steps=1, cfg_scale=20)
    extra = client(live).txt2img(prompt=PROMPT, seed=5, steps=1, cfg_scale=20, negative_prompt="hat, glasses")
    assert extra.info["negative_prompt"] == f"{NEGATIVE_PROMPT}, hat, glasses"
    assert f"Negative prompt: {NEGATIVE_PROMPT}, hat, glasses" in extra.info["infotexts"][0]
    assert plain.json["images"][0] != extra.json["images"][0]
