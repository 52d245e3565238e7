"""The web playground at `/`: one static page (service/http/static/) that calls the API from the browser.

Same origin as the API, so no CORS. The page reads the request's bounds and defaults from /openapi.json and
the rest from /playground/config.json (the prompt template's trigger words, the server's default steps and
guidance, whether the upscaler is enabled): nothing is repeated by hand in the page. None of these routes
needs the bearer token (the page asks for it) and none is in the OpenAPI schema.
"""

from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from service.config import DEFAULT_STRENGTH, Settings
from service.prompts import PROMPT_PREFIX, PROMPT_SUFFIX
from service.sprite_controls import PRESETS

STATIC = resources.files("service.http") / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidated on each load, so an upgraded server's page is seen at once

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=NO_CACHE)


@router.get("/playground/config.json")
async def playground_config(request: Request) -> JSONResponse:
    """What the OpenAPI schema cannot say: the template around the user's words and this server's settings."""
    settings: Settings = request.app.state.settings
    return JSONResponse(
        {
            "prompt_prefix": PROMPT_PREFIX,
            "prompt_suffix": PROMPT_SUFFIX,
            "defaults": {
                "num_inference_steps": settings.steps,
                "guidance_scale": settings.guidance,
                "integer_scale": settings.integer_scale,
                "strength": DEFAULT_STRENGTH,
            },
            "palette_presets": list(PRESETS),
            "upscaler_enabled": settings.upscaler == "realesrgan",
            "token_required": settings.api_token is not None,
        },
        headers=NO_CACHE,
    )


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, "not found")
    return Response((STATIC / name).read_bytes(), media_type=ASSETS[name], headers=NO_CACHE)
