"""OpenAI's Images API over the same engine, batcher, auth and limits as /v1/generate, so the official `openai`
client (and Open WebUI, LibreChat, LiteLLM...) works with a `base_url`: POST /v1/images/generations,
POST /v1/images/variations (the client's `images.create_variation`: a form with the image), GET /v1/models.

What this server cannot do is refused with OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`,
never silently changed: sizes other than 1024x1024 (the 24x24 sprite is delivered at 1024 px), `response_format`
"url" (no files are hosted here), models other than "bespoke-punks" or a LoRA name. OpenAI has no seed: this
server reads an extra `seed` field (the client's `extra_body={"seed": 7}`) and returns each image's seed.
`background` "transparent" (gpt-image-1's) makes the punk's background transparent, as /v1/generate does.
A variation has no prompt in OpenAI's API: it is described as VARIATION_PROMPT unless the form has a `prompt`; its
`strength` (0-1, extra) says how far it may move from the image.
"""

import asyncio
import base64
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException

from service import config
from service.delivery import encode_images
from service.engine import Engine, GenerationRequest
from service.http.deps import (
    CLIENT_CLOSED_REQUEST,
    MODEL,
    ReadyEngine,
    Service,
    ServiceDep,
    engine_request,
    lora_of_model,
    model_names,
    printable,
    shaped_route,
)
from service.images import decode_image

SIZE = "1024x1024"
OUTPUT_SIZE = 1024
VARIATION_PROMPT = "punk"
# The engine's field names (RequestError.field, service/engine.py) as this API calls them.
PARAMS = {"num_outputs": "n", "lora": "model", "output_size": "size"}
ERROR_TYPES = {401: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "server_error"}
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 503: "service_unavailable", 504: "timeout"}
VALIDATION_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}


class ImageGenerationRequest(BaseModel):
    """OpenAI's body (https://platform.openai.com/docs/api-reference/images/create), plus `seed`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=config.MAX_PROMPT_CHARS)]
    model: str | None = Field(None, max_length=200, description=f"'{MODEL}' (default) or a LoRA name from /v1/models.")
    n: int | None = Field(None, ge=1, le=config.MAX_IMAGES, description="Images to generate (default 1).")
    size: str | None = Field(None, max_length=50, description=f"'{SIZE}' (default; 'auto' is the same); no other.")
    response_format: str | None = Field(None, max_length=50, description="'b64_json' only (no files are hosted).")
    output_format: Literal["png"] | None = Field(None, description="'png' only.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="'transparent': alpha 0 on the punk's background (a PNG with transparency)."
    )
    quality: str | None = Field(None, max_length=50, description="Accepted and ignored.")
    style: str | None = Field(None, max_length=50, description="Accepted and ignored.")
    moderation: str | None = Field(None, max_length=50, description="Accepted and ignored.")
    user: str | None = Field(None, max_length=500, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, max_length=500, description="Accepted and ignored.")
    stream: Literal[False] | None = Field(None, description="Streaming is not offered.")
    seed: int | None = Field(
        None, ge=0, le=config.MAX_SEED, description="Not OpenAI's: send it with extra_body. Random when omitted."
    )


class ImageData(BaseModel):
    b64_json: str = Field(description="Base64 of the 1024x1024 PNG.")
    revised_prompt: str = Field(description="The templated prompt actually encoded.")
    seed: int = Field(description="Not OpenAI's: this image's seed (image i has seed + i).")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str = SIZE


class Model(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "bespoke-punks"


class ModelList(BaseModel):
    object: str = "list"
    data: list[Model]


class OpenAIError(Exception):
    """Answered as `{"error": {...}}` with this status."""

    def __init__(self, status: int, message: str, param: str | None, code: str | None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, self.status, headers)


def error_response(error: Exception) -> Response | None:
    """Every failure of these routes in OpenAI's shape: validation (400), auth (401), size (413), queue (429), 503,
    504; None for an exception that is no client-facing failure."""
    if isinstance(error, OpenAIError):
        return error.response()
    if isinstance(error, RequestValidationError):
        return _invalid(error.errors()).response()
    if isinstance(error, HTTPException):
        status = error.status_code
        message = str(error.detail)
        if status == 401:
            message = "Incorrect API key provided (the bearer token is PUNKS_API_TOKEN)"
        kind, code = ERROR_TYPES.get(status), ERROR_CODES.get(status)
        return OpenAIError(status, message, None, code, kind).response(dict(error.headers or {}))
    return None


router = APIRouter(route_class=shaped_route(error_response), tags=["OpenAI Images API"])
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": f"OpenAI's error shape: {{'error': {{'message', 'type', 'param', 'code'}}}} ({what})"}
    for status, what in [
        (400, "bad input"),
        (401, "bearer token"),
        (413, "body too large"),
        (429, "queue full"),
        (503, "unavailable"),
        (504, "not answered in time"),
    ]
}


@router.get("/v1/models", summary="The models /v1/images/generations accepts, in OpenAI's shape.")
async def models(engine: ReadyEngine) -> ModelList:
    return ModelList(data=[Model(id=name) for name in model_names(engine)])


@router.get("/v1/models/{model}", summary="One model, in OpenAI's shape (404 if not offered).")
async def model(model: str, engine: ReadyEngine) -> Model:
    if model not in model_names(engine):
        raise OpenAIError(
            404, "The model does not exist on this server (see GET /v1/models)", "model", "model_not_found"
        )
    return Model(id=model)


@router.post(
    "/v1/images/generations",
    summary="OpenAI-compatible image generation (1024x1024 PNGs as b64_json).",
    response_model=ImagesResponse,
    responses=ERRORS,
)
async def generations(body: ImageGenerationRequest, http: Request, service: ServiceDep) -> Response:
    _check_size_and_format(body.size, body.response_format)
    engine = service.ready_engine()
    request = GenerationRequest(
        prompt=body.prompt,
        seed=body.seed,
        num_outputs=body.n or 1,
        lora=_lora(engine, body.model),
        output_size=OUTPUT_SIZE,
        integer_scale=False,  # exactly 1024x1024, whatever PUNKS_INTEGER_SCALE says
        output_format="png",
        background="transparent" if body.background == "transparent" else "keep",
    )
    return await _respond(service, request, http)


@router.post(
    "/v1/images/variations",
    summary="OpenAI-compatible variations of an image (a form, as the client's images.create_variation sends it).",
    response_model=ImagesResponse,
    responses=ERRORS,
)
async def variations(
    http: Request,
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="The image to vary: a 24x24 sprite or any PNG, JPEG, WebP.")],
    model: Annotated[str | None, Form(max_length=200)] = None,
    n: Annotated[int | None, Form(ge=1, le=config.MAX_IMAGES)] = None,
    size: Annotated[str | None, Form(max_length=50)] = None,
    response_format: Annotated[str | None, Form(max_length=50)] = None,
    user: Annotated[str | None, Form(max_length=500, description="Accepted and ignored.")] = None,
    prompt: Annotated[
        str | None,
        Form(max_length=config.MAX_PROMPT_CHARS, description=f"Not OpenAI's. Default: '{VARIATION_PROMPT}'."),
    ] = None,
    strength: Annotated[
        float | None,
        Form(ge=config.MIN_STRENGTH, le=config.MAX_STRENGTH, allow_inf_nan=False, description="Not OpenAI's (0-1)."),
    ] = None,
    seed: Annotated[int | None, Form(ge=0, le=config.MAX_SEED, description="Not OpenAI's.")] = None,
) -> Response:
    _check_size_and_format(size, response_format)
    engine = service.ready_engine()
    data = await image.read()
    request = await engine_request(
        lambda: GenerationRequest(
            prompt=prompt if prompt and prompt.strip() else VARIATION_PROMPT,
            seed=seed,
            num_outputs=n or 1,
            lora=_lora(engine, model),
            output_size=OUTPUT_SIZE,
            integer_scale=False,
            output_format="png",
            image=decode_image(data),
            strength=strength,
        )
    )
    return await _respond(service, request, http)


def _check_size_and_format(size: str | None, response_format: str | None) -> None:
    if size not in (None, SIZE, "auto"):
        message = f"Invalid value for 'size': only '{SIZE}' is supported ('auto' means it too)"
        raise OpenAIError(400, message, "size", "invalid_value")
    if response_format not in (None, "b64_json"):
        message = "Invalid value for 'response_format': only 'b64_json' is supported (no image URLs are hosted)"
        raise OpenAIError(400, message, "response_format", "invalid_value")


async def _respond(service: Service, request: GenerationRequest, http: Request) -> Response:
    """Queue the request and answer its images in OpenAI's shape."""
    done = await service.submit(request, http)
    if done is None:  # the client hung up
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    images = await asyncio.to_thread(encode_images, done.result.images, "png", False)
    data = [
        ImageData(
            b64_json=base64.b64encode(image.image).decode("ascii"),
            revised_prompt=done.result.prompt,
            seed=image.seed,
        )
        for image in images
    ]
    return Response(
        ImagesResponse(created=int(time.time()), data=data).model_dump_json(), media_type="application/json"
    )


def _lora(engine: Engine, model: str | None) -> str | None:
    """The engine's `lora` for an OpenAI `model`: None for the default, a LoRA name, or a 400 naming model."""
    try:
        return lora_of_model(engine, model)
    except LookupError:
        allowed = ", ".join(model_names(engine))
        message = f"Invalid value for 'model': this server offers {allowed} (GET /v1/models)"
        raise OpenAIError(400, message, "model", "invalid_value") from None


def _invalid(errors: Sequence[Any]) -> OpenAIError:
    """The first validation error as OpenAI words it: 400, the parameter's name, never the input."""
    first = errors[0] if errors else {}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = PARAMS.get(str(loc[0]), str(loc[0])) if loc else None
    param = printable(param) if param is not None else None
    kind = str(first.get("type", "value_error"))
    if kind.startswith("json") or (not loc and kind == "missing"):
        message = "We could not parse the JSON body of your request: send a JSON object"
        return OpenAIError(400, message, None, "invalid_json")
    if not loc:  # the body as a whole: not an object, or a key that is not valid Unicode
        return OpenAIError(400, f"Invalid body: {printable(str(first.get('msg', 'invalid')))}", None, "invalid_value")
    message = f"Invalid value for '{param}': {printable(str(first.get('msg', 'invalid')))}"
    if kind == "missing":
        message = f"Missing required parameter: '{param}'"
    elif kind == "extra_forbidden":
        message = f"Unknown parameter: '{param}'"
    return OpenAIError(400, message, param, VALIDATION_CODES.get(kind, "invalid_value"))
