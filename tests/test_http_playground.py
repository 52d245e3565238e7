"""The web playground at / (service/http/playground.py), driven in a real headless Chromium by Playwright.

The browser is Debian's chromium at /usr/bin/chromium (`make test` installs it when run as root); Playwright's own
browser download is never used. A missing browser is a failure, not a skip: CI must run these tests.
"""

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.config import MAX_STEPS, Settings
from service.prompts import PROMPT_PREFIX, PROMPT_SUFFIX
from service.samplers import SAMPLER_NAMES
from tests.live_server import make_app, thread_server

CHROMIUM = Path("/usr/bin/chromium")
# The flags that work on these machines (closed network: no background connections, no component updates).
# Playwright starts each browser with a fresh temporary profile (--user-data-dir) of its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RESULT_TIMEOUT_MS = 120_000  # the smoke model on the CPU takes seconds; a loaded CI machine more
TOKEN = "playground-secret"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y --no-install-recommends chromium`; "
        "`make test` does this when run as root)"
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def guarded(fast_engine, smoke_settings: Settings) -> Iterator[str]:
    """A second server, with PUNKS_API_TOKEN set."""
    with thread_server(make_app(smoke_settings, lambda: fast_engine, api_token=TOKEN)) as url:
        yield url


def open_page(browser, url: str, **context_options):
    context = browser.new_context(**context_options)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return page, errors


def decoded(data_url: str) -> Image.Image:
    header, _, payload = data_url.partition(",")
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_page_and_assets_are_served_without_a_token(guarded: str):
    page = httpx.get(f"{guarded}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/playground/app.js" in page.text and "/playground/style.css" in page.text
    assert httpx.get(f"{guarded}/playground/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{guarded}/playground/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{guarded}/playground/index.html").status_code == 404  # only the two assets, no listing
    config = httpx.get(f"{guarded}/playground/config.json").json()
    assert config["prompt_prefix"] == PROMPT_PREFIX and config["prompt_suffix"] == PROMPT_SUFFIX
    assert config["token_required"] is True and config["upscaler_enabled"] is False
    assert config["defaults"]["num_inference_steps"] == 1  # the server's own setting (tests/live_server.py FAST)
    assert "/" not in httpx.get(f"{guarded}/openapi.json").json()["paths"]  # not part of the API
    assert httpx.get(f"{guarded}/v1/loras").status_code == 401  # the API itself stays guarded


def test_generate_from_the_page(live: str, browser, tmp_path: Path):
    page, errors = open_page(browser, live)
    # The trigger words are shown around the field, not typed; bounds and defaults are the schema's and server's.
    assert page.inner_text("#prompt-prefix") == PROMPT_PREFIX.strip()
    assert page.inner_text("#prompt-suffix") in PROMPT_SUFFIX
    assert page.get_attribute("#num_inference_steps", "max") == str(MAX_STEPS)
    assert page.input_value("#num_inference_steps") == "1" and page.input_value("#num_outputs") == "1"
    assert page.input_value("#seed") == ""  # random
    page.wait_for_function("document.querySelectorAll('#lora option').length > 0")
    options = page.eval_on_selector_all("#sampler option", "options => options.map(o => o.value)")
    assert options == ["", *SAMPLER_NAMES]  # the server default, then /openapi.json's enum
    page.select_option("#sampler", "Euler a")

    page.fill("#prompt", "lad with a red beanie, green background")
    page.fill("#seed", "7")
    page.press("#prompt", "Enter")  # keyboard only
    page.wait_for_selector("#busy:has-text('Rendering')")
    page.wait_for_selector("#result:not([hidden]) .card", timeout=RESULT_TIMEOUT_MS)

    card = page.locator("#images .card").first
    full = decoded(card.locator("img.full").get_attribute("src"))
    sprite = decoded(card.locator("img.sprite").get_attribute("src"))
    assert full.size == (1024, 1024) and sprite.size == (24, 24)
    assert card.locator("img.full").evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    assert card.locator("img.full").evaluate("img => img.complete && img.naturalWidth") == 1024
    swatches = card.locator(".palette .swatch")
    assert swatches.count() == len(sprite.getcolors(24 * 24))  # every colour of the sprite, with its hex code
    hexes = swatches.locator("code").all_inner_texts()
    assert all(len(code) == 7 and code.startswith("#") for code in hexes)
    assert card.locator(".seed").inner_text() == "7"
    assert card.locator(".verdict").inner_text() in {"pixel art", "not pixel art"}
    assert "total" in page.inner_text("#result-meta")
    assert card.locator(".download-image").get_attribute("download") == "punk-7.png"
    assert card.locator(".download-sprite").get_attribute("download") == "punk-7-sprite.png"
    assert page.inner_text("#busy").startswith("Done in")

    # The gallery is kept in the browser: one entry, still there after a reload.
    assert page.locator("#gallery li").count() == 1
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#gallery li").count() == 1
    assert page.locator("#upscaler-field").is_hidden()  # PUNKS_UPSCALER is not realesrgan here
    page.click("#gallery li button")
    assert page.locator("#images .card .seed").first.inner_text() == "7"
    assert page.input_value("#prompt") == "lad with a red beanie, green background"
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").stat().st_size > 0

    # "reuse this seed" puts the result's seed back into the form.
    page.fill("#seed", "")
    page.click("#images .card .reuse")
    assert page.input_value("#seed") == "7"
    assert errors == []


def test_field_errors_are_shown_next_to_the_field(live: str, browser):
    page, errors = open_page(browser, live)
    page.fill("#prompt", "punk with a cap")
    page.fill(
        "#num_inference_steps", str(MAX_STEPS + 1)
    )  # the page leaves the bounds to the server (its 422 names steps)
    page.press("#num_inference_steps", "Enter")
    message = page.locator("[data-field=num_inference_steps] .error")
    message.wait_for(timeout=RESULT_TIMEOUT_MS)
    assert "less than or equal to 100" in message.inner_text()
    assert page.get_attribute("#num_inference_steps", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "num_inference_steps"
    assert page.locator("#result").is_hidden() and page.locator("[data-field=prompt] .error").is_hidden()

    page.fill("#num_inference_steps", "1")
    page.fill("#prompt", "   ")  # empty after stripping: the server's message lands next to the prompt
    page.press("#prompt", "Enter")
    page.locator("[data-field=prompt] .error").wait_for(timeout=RESULT_TIMEOUT_MS)
    assert page.locator("[data-field=num_inference_steps] .error").is_hidden()
    assert errors == []


def test_retry_notice_on_429(live: str, browser):
    page, _ = open_page(browser, live)
    body = json.dumps({"detail": "too many queued requests"})
    page.route(
        "**/v1/generate",
        lambda route: route.fulfill(
            status=429, body=body, headers={"Retry-After": "5"}, content_type="application/json"
        ),
    )
    page.fill("#prompt", "punk")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#notice:not([hidden])")
    assert "Retry in 5 s" in page.inner_text("#notice") and "queue" in page.inner_text("#notice")


def test_token_field(guarded: str, browser):
    page, errors = open_page(browser, guarded)
    assert page.locator("#token-box").get_attribute("open") is not None  # the server wants one: shown
    page.locator("[data-field=token] .error").wait_for()  # GET /v1/loras said 401

    page.fill("#prompt", "punk with a cap")
    page.press("#prompt", "Enter")
    page.wait_for_selector("[data-field=token] .error:has-text('wrong bearer token')", timeout=RESULT_TIMEOUT_MS)

    page.fill("#token", TOKEN)
    page.press("#token", "Enter")  # stores it, then submits with it
    page.wait_for_selector("#result:not([hidden]) .card", timeout=RESULT_TIMEOUT_MS)
    assert page.locator("[data-field=token] .error").is_hidden()
    assert page.evaluate("localStorage.getItem('punks.token')") == TOKEN
    page.reload()  # kept in the browser's storage
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#token") == TOKEN
    page.wait_for_function("document.querySelectorAll('#lora option').length > 0")  # /v1/loras with the token
    assert errors == []


def test_phone_sized_window(live: str, browser, tmp_path: Path):
    page, errors = open_page(browser, live, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.fill("#prompt", "punk with a cap, blue background")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#result:not([hidden]) .card", timeout=RESULT_TIMEOUT_MS)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    width = page.locator("#images img.full").first.bounding_box()["width"]
    assert 250 < width <= 390
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    assert errors == []


def test_palette_background_and_a_variation_of_an_uploaded_image_from_the_page(live: str, browser, tmp_path: Path):
    import numpy as np

    from service.sprite_controls import PRESETS, rgb_codes
    from train import sprites

    page, errors = open_page(browser, live)
    options = page.eval_on_selector_all("#palette-presets option", "options => options.map(o => o.value)")
    assert options == list(PRESETS)
    start = tmp_path / "start.png"
    Image.fromarray(sprites.render(sprites.random_punk(np.random.default_rng(8)))).save(start)
    page.fill("#prompt", "lad with a red beanie")
    page.fill("#seed", "5")
    page.fill("#num_inference_steps", "4")  # a variation at strength 0.5 runs 2 of them
    page.fill("#palette", "game-boy")
    page.select_option("#background", "transparent")
    page.set_input_files("#image", str(start))
    page.wait_for_selector("#start:not([hidden])")
    page.fill("#strength", "0.5")
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden]) .card", timeout=RESULT_TIMEOUT_MS)

    card = page.locator("#images .card").first
    full = np.asarray(decoded(card.locator("img.full").get_attribute("src")).convert("RGBA"))
    game_boy = {tuple(colour) for colour in rgb_codes(PRESETS["game-boy"]).tolist()}
    assert {tuple(pixel) for pixel in full[..., :3][full[..., 3] == 255].tolist()} <= game_boy
    cells = int(card.locator(".background_cells").inner_text().split()[0])
    assert cells > 0 and (full[..., 3] == 0).any()
    assert set(card.locator(".palette code").all_inner_texts()) <= set(PRESETS["game-boy"])
    stored = json.loads(page.evaluate("sessionStorage.getItem('punks.gallery')"))[-1]["request"]
    assert "image" not in stored and stored["palette"] == "game-boy" and stored["strength"] == 0.5

    card.locator(".vary").click()  # the result's sprite becomes the next start image
    assert page.get_attribute("#start-image", "src").startswith("data:image/png;base64,")
    page.select_option("#background", "colour")
    page.fill("#background-colour", "#ff00ff")
    page.fill("#palette", "")
    page.click("#submit")
    page.wait_for_selector("#busy:has-text('Rendering')")
    page.wait_for_selector("#busy:has-text('Done')", timeout=RESULT_TIMEOUT_MS)
    again = page.locator("#images .card").first
    assert "#ff00ff" in again.locator(".palette code").all_inner_texts()

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"no image in here")
    page.set_input_files("#image", str(junk))
    page.wait_for_selector("#start:not([hidden])")
    page.click("#submit")
    page.wait_for_selector("#error-image:not(:empty)", timeout=RESULT_TIMEOUT_MS)
    assert "not a complete image" in page.inner_text("#error-image")
    assert errors == []
