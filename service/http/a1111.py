"""AUTOMATIC1111's web UI API (the part clients use for text to image and image to image) over the same engine,
batcher, auth and limits as /v1/generate, so `webuiapi`, SillyTavern, Krita/Photoshop plugins and Discord bots can
point at this server: POST /sdapi/v1/txt2img and /sdapi/v1/img2img, and GET /sdapi/v1/sd-models, samplers,
schedulers, options, scripts for the clients that list them at start.

img2img takes one image in `init_images` (base64, with or without a data: URL prefix) and `denoising_strength`
(A1111's default 0.75) as a variation's `image` and `strength`; an inpainting `mask` is refused.

As in A1111, unknown fields are ignored (clients send dozens: hires fix, ControlNet, ...), bad values are a
422 `{"detail": [{"type", "loc", "msg"}]}` and other failures `{"error", "detail", "body", "errors"}` with the
status. A negative prompt is added to the engine's fixed one (against the known failures), never replacing it.
What would change the picture and this server cannot do is refused naming the field, never ignored: a sampler or
scheduler not in service/samplers.py, hires fix, face restoration, tiling, styles, scripts, variation seeds,
width != height.

`width` (= `height`) is the delivered size of the snapped 24x24 sprite (default 512, like A1111's; 1024 gives
/v1/generate's default); the diffusion itself always runs at 512. `batch_size * n_iter` images, at most 4,
with seeds seed, seed + 1, ... (A1111's all_seeds); seed -1 is random.

Samplers are per request (service/samplers.py): `sampler_name` (or the deprecated `sampler_index`) by A1111's
names and aliases, with A1111 1.9's separate `scheduler` folded in ("DPM++ 2M" + "Karras" is "DPM++ 2M Karras");
none given: the deployment's PUNKS_SCHEDULER. `info` and the infotexts name the sampler actually used.
"""

import asyncio
import base64
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException

from service import config, samplers
from service.delivery import encode_images
from service.engine import Engine, GenerationRequest
from service.errors import RequestError
from service.http import deps
from service.images import decode_base64_image

# The engine's field names (RequestError.field, service/engine.py) as this API calls them.
FIELDS = {
    "num_outputs": "batch_size",
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "output_size": "width",
    "lora": "override_settings",
    "image": "init_images",
    "strength": "denoising_strength",
}


class Txt2ImgRequest(BaseModel):
    """The fields of A1111's StableDiffusionTxt2ImgProcessingAPI this server reads; others are ignored."""

    model_config = ConfigDict(extra="ignore")  # A1111's: clients send every field they know

    prompt: Annotated[str, StringConstraints(max_length=config.MAX_PROMPT_CHARS)] = ""
    negative_prompt: str | None = Field(
        "", max_length=config.MAX_PROMPT_CHARS, description="Added to the fixed negative prompt (which stays)."
    )
    styles: list[str] | None = Field(None, max_length=100, description="Refused unless empty.")
    seed: int = Field(-1, ge=-1, le=config.MAX_SEED, description="-1: random. Image i has seed + i.")
    subseed_strength: float = Field(0.0, allow_inf_nan=False, description="Variation seeds: refused unless 0.")
    sampler_name: str | None = Field(None, max_length=100, description="A1111 name or alias (GET /sdapi/v1/samplers).")
    sampler_index: str | None = Field(None, max_length=100, description="Deprecated alias of sampler_name.")
    scheduler: str | None = Field(
        None, max_length=100, description="'Automatic' or 'Karras' (GET /sdapi/v1/schedulers)."
    )
    batch_size: int = Field(1, ge=1, le=config.MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=config.MAX_IMAGES, description="batch_size * n_iter <= 4.")
    steps: int | None = Field(None, ge=config.MIN_STEPS, le=config.MAX_STEPS, description="Default: PUNKS_STEPS.")
    cfg_scale: float | None = Field(
        None,
        ge=config.MIN_GUIDANCE,
        le=config.MAX_GUIDANCE,
        allow_inf_nan=False,
        description="Default: PUNKS_GUIDANCE.",
    )
    width: int = Field(512, ge=config.MIN_OUTPUT_SIZE, le=config.MAX_OUTPUT_SIZE, description="Delivered size.")
    height: int = Field(512, ge=config.MIN_OUTPUT_SIZE, le=config.MAX_OUTPUT_SIZE, description="Must equal width.")
    enable_hr: bool | None = Field(False, description="Hires fix: refused.")
    restore_faces: bool | None = Field(False, description="Refused.")
    tiling: bool | None = Field(False, description="Refused.")
    script_name: str | None = Field(None, max_length=200, description="Scripts: refused.")
    send_images: bool = True
    override_settings: dict[str, Any] | None = Field(
        None, description="Only sd_model_checkpoint is read: a name from GET /sdapi/v1/sd-models."
    )


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionImg2ImgProcessingAPI: txt2img's fields plus the image and its strength."""

    init_images: list[Annotated[str, StringConstraints(max_length=config.MAX_IMAGE_BYTES * 4 // 3 + 100)]] = Field(
        max_length=1, description="One base64 image (a data: URL prefix is accepted)."
    )
    denoising_strength: float = Field(
        0.75, ge=config.MIN_STRENGTH, le=config.MAX_STRENGTH, allow_inf_nan=False, description="0-1."
    )
    mask: str | None = Field(None, max_length=100, description="Inpainting: refused.")


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs.")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: prompt, seed, all_seeds, sampler_name, steps, cfg_scale, infotexts, ...")


def error_response(error: Exception) -> Response | None:
    """A1111's error shapes: 422 `{"detail": [...]}` for bad values (named as this API names them), and
    `{"error", "detail", "body", "errors"}` for every HTTPException (401, 413, 429, 503, 504)."""
    if isinstance(error, RequestValidationError):
        return deps.validation_response([item | {"loc": _renamed(item.get("loc", ()))} for item in error.errors()])
    if isinstance(error, HTTPException):
        body = {
            "error": "HTTPException",
            "detail": error.detail,
            "body": "",
            "errors": f"{error.status_code}: {error.detail}",
        }
        return JSONResponse(body, error.status_code, dict(error.headers or {}))
    return None


router = APIRouter(prefix="/sdapi/v1", route_class=deps.shaped_route(error_response), tags=["AUTOMATIC1111 API"])


@router.post(
    "/txt2img",
    summary="A1111-compatible text to image (base64 PNGs, info as a JSON string).",
    response_model=Txt2ImgResponse,
)
async def txt2img(body: Txt2ImgRequest, http: Request, service: deps.ServiceDep) -> Response:
    return await _generate(body, http, service)


@router.post(
    "/img2img",
    summary="A1111-compatible image to image: variations of init_images[0] (base64 PNGs, info as a JSON string).",
    response_model=Txt2ImgResponse,
)
async def img2img(body: Img2ImgRequest, http: Request, service: deps.ServiceDep) -> Response:
    errors = [
        ("init_images", not body.init_images, "give one image"),
        ("mask", bool(body.mask), "inpainting is not supported (leave it empty)"),
    ]
    if refused := [{"type": "value_error", "loc": ("body", f), "msg": why} for f, bad, why in errors if bad]:
        raise RequestValidationError(refused)
    return await _generate(body, http, service, body.init_images[0], body.denoising_strength)


async def _generate(
    body: Txt2ImgRequest, http: Request, service: deps.Service, image: str | None = None, strength: float | None = None
) -> Response:
    """Both routes: the request in the engine's words, queued, answered with A1111's images, parameters and info."""
    sampler = _check_unsupported(body, samplers.DEFAULTS[service.settings.scheduler])
    engine = service.ready_engine()
    lora = _lora(engine, (body.override_settings or {}).get("sd_model_checkpoint"))
    request = await deps.engine_request(
        lambda: GenerationRequest(
            prompt=body.prompt,
            seed=None if body.seed == -1 else body.seed,
            num_outputs=body.batch_size * body.n_iter,
            num_inference_steps=body.steps,
            guidance_scale=body.cfg_scale,
            negative_prompt=body.negative_prompt or None,  # added to the fixed negative prompt, never replacing it
            sampler=sampler,
            lora=lora,
            output_size=body.width,
            integer_scale=False,  # exactly width x height
            output_format="png",
            image=decode_base64_image(image, "init_images") if image is not None else None,
            strength=strength,
        )
    )
    done = await service.submit(request, http)
    if done is None:  # the client hung up
        return Response(status_code=deps.CLIENT_CLOSED_REQUEST)
    result = done.result
    images = await asyncio.to_thread(encode_images, result.images, "png", False)
    seeds = [image.seed for image in images]
    count = len(seeds)
    model = lora or deps.MODEL
    sampler = result.sampler  # the one used
    schedule = samplers.SCHEDULES[samplers.KARRAS if sampler.endswith(" Karras") else samplers.AUTOMATIC]
    infotexts = [
        f"{result.prompt}\nNegative prompt: {result.negative_prompt}\nSteps: {result.steps}, Sampler: {sampler}, "
        f"Schedule type: {schedule}, CFG scale: {result.guidance:g}, Seed: {seed}, "
        f"Size: {body.width}x{body.height}, Model: {model}"
        for seed in seeds
    ]
    info = {
        "prompt": result.prompt,  # the templated prompt actually encoded
        "all_prompts": [result.prompt] * count,
        "negative_prompt": result.negative_prompt,
        "all_negative_prompts": [result.negative_prompt] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0.0,
        "width": body.width,
        "height": body.height,
        "sampler_name": sampler,
        "scheduler": schedule,
        "cfg_scale": result.guidance,
        "steps": result.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "restore_faces": False,
        "sd_model_name": model,
        "sd_model_hash": None,
        "styles": [],
        "clip_skip": 1,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "extra_generation_params": {},
        "version": "bespoke-punks",
        # Not A1111's: what /v1/generate says about each image and the prompt.
        "dropped_words": result.dropped_words,
        "images": [image.summary for image in images],
    }
    parameters = body.model_dump(exclude={"override_settings", "init_images"}) | {
        "override_settings": {"sd_model_checkpoint": model},
        "sampler_name": sampler,
        "scheduler": schedule,
    }
    payload = Txt2ImgResponse(
        images=[base64.b64encode(image.image).decode("ascii") for image in images] if body.send_images else [],
        parameters=parameters,
        info=json.dumps(info),
    )
    return Response(payload.model_dump_json(), media_type="application/json")


@router.get("/sd-models", summary="The models txt2img can use (override_settings.sd_model_checkpoint).")
async def sd_models(engine: deps.ReadyEngine) -> list[dict[str, Any]]:
    return [
        {"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
        for name in deps.model_names(engine)
    ]


@router.get("/samplers", summary="The samplers txt2img accepts (sampler_name), with A1111's aliases.")
async def samplers_list() -> list[dict[str, Any]]:
    return [
        {
            "name": sampler.name,
            "aliases": list(sampler.aliases),
            "options": {"scheduler": samplers.KARRAS} if dict(sampler.options).get("use_karras_sigmas") else {},
        }
        for sampler in samplers.SAMPLERS.values()
    ]


@router.get("/schedulers", summary="The noise schedules txt2img accepts (scheduler), folded into the sampler.")
async def schedulers() -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "label": label,
            "aliases": None,
            "default_rho": 7.0 if name == samplers.KARRAS else -1,
            "need_inner_model": False,
        }
        for name, label in samplers.SCHEDULES.items()
    ]


@router.get("/options", summary="The few options clients read at start.")
async def options() -> dict[str, Any]:
    return {"sd_model_checkpoint": deps.MODEL, "samples_format": "png"}


@router.get("/scripts", summary="No scripts (clients probe for ControlNet and the like).")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


def _check_unsupported(body: Txt2ImgRequest, default: str) -> str:
    """Refuse, naming the field, what would change the picture and this server cannot do. Returns the sampler's
    name (service/samplers.py): sampler_name (or sampler_index) with the scheduler folded in, or `default`."""
    sampler_field = "sampler_name" if body.sampler_name else "sampler_index"
    sampler, sampler_error = default, None
    try:
        chosen = samplers.lookup(body.sampler_name or body.sampler_index or default, sampler_field)
        sampler = samplers.with_schedule(chosen, body.scheduler).name
    except RequestError as error:
        sampler_error = error
    refusals = [
        (
            sampler_error.field if sampler_error else sampler_field,
            sampler_error is not None,
            sampler_error.reason if sampler_error else "",
        ),
        ("height", body.height != body.width, "must equal width: the portrait is square"),
        ("enable_hr", bool(body.enable_hr), "hires fix is not supported (the 24x24 sprite is upscaled exactly)"),
        ("restore_faces", bool(body.restore_faces), "not supported"),
        ("tiling", bool(body.tiling), "not supported"),
        ("styles", bool(body.styles), "not supported (leave it empty)"),
        ("script_name", bool(body.script_name), "scripts are not supported"),
        ("subseed_strength", body.subseed_strength != 0, "variation seeds are not supported (leave it 0)"),
        (
            "n_iter",
            body.batch_size * body.n_iter > config.MAX_IMAGES,
            f"batch_size * n_iter must be at most {config.MAX_IMAGES}",
        ),
    ]
    errors = [{"type": "value_error", "loc": ("body", field), "msg": why} for field, bad, why in refusals if bad]
    if errors:
        raise RequestValidationError(errors)
    return sampler


def _lora(engine: Engine, checkpoint: object) -> str | None:
    """The engine's `lora` for A1111's sd_model_checkpoint: None for the default, a LoRA name, or a 422."""
    try:
        return deps.lora_of_model(engine, checkpoint)
    except LookupError:
        allowed = ", ".join(deps.model_names(engine))
        why = f"unknown model; allowed: {allowed} (GET /sdapi/v1/sd-models)"
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "override_settings"), "msg": why}]
        ) from None


def _renamed(loc: Any) -> tuple:
    """An error's location with the engine's field names (service/engine.py) in this API's words."""
    parts = tuple(loc)
    if len(parts) >= 2 and parts[0] == "body" and parts[1] in FIELDS:
        return ("body", FIELDS[parts[1]], *parts[2:])
    return parts
