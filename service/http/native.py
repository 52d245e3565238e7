"""The native API: POST /v1/generate, GET /v1/loras, and the operational routes (/healthz, /readyz, /metrics).
Errors in FastAPI's shape: 422 `{"detail": [{"type", "loc", "msg"}]}` (deps.validation_response), others
`{"detail": "..."}`."""

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.batcher import Done
from service.delivery import MEDIA_TYPES, encode_images
from service.http.deps import CLIENT_CLOSED_REQUEST, RETRY_AFTER_S, ReadyEngine, ServiceDep, engine_request
from service.http.schemas import GenerateRequest, GenerateResponse, Timings

PNG_RESPONSE = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}

operations = APIRouter()  # open: health checks and scrapers carry no token
router = APIRouter()  # behind the token check (create_app)


@operations.head("/healthz", include_in_schema=False)
@operations.get("/healthz", summary="Liveness: 503 once the engine failed to load or the generation worker died.")
async def healthz(service: ServiceDep) -> JSONResponse:
    if reason := service.broken():
        return JSONResponse({"status": "broken", "detail": reason}, 503)
    return JSONResponse({"status": "alive"})


@operations.head("/readyz", include_in_schema=False)
@operations.get("/readyz", summary="Readiness: 200 while requests can be served; 503 loading, broken or shutting down.")
async def readyz(service: ServiceDep) -> JSONResponse:
    reason = service.unavailable()
    if reason is not None:
        body = {"status": "unavailable", "detail": reason}
        if service.load_error:
            body["error"] = service.load_error  # the exception's type: the message is in the log
        return JSONResponse(body, 503, {"Retry-After": RETRY_AFTER_S})
    assert service.engine is not None  # unavailable() said None: loaded
    return JSONResponse({"status": "ready", "smoke_model": service.engine.is_smoke})


@operations.get("/metrics", summary="Prometheus metrics.", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/loras", summary="LoRA names a request may pick (field `lora`); `default` is served without one.")
async def loras(engine: ReadyEngine) -> dict[str, object]:
    return {"default": engine.default_lora, "loras": engine.lora_names}


@router.post(
    "/v1/generate",
    summary="Generate punks from a description.",
    description="JSON with base64 images by default. With `Accept: image/png`: the first image's PNG bytes, "
    "its seed and quality signals in X-* headers (output_format and return_sprites are then ignored).",
    response_model=GenerateResponse,
    responses={
        200: PNG_RESPONSE,
        401: {"description": "Missing or wrong bearer token (when PUNKS_API_TOKEN is set)."},
        408: {"description": "Body not received within PUNKS_BODY_TIMEOUT_S (the connection is closed)."},
        413: {"description": "Body larger than PUNKS_MAX_IMAGE_BODY_BYTES (this route takes an image)."},
        429: {"description": "Queue full; retry after Retry-After seconds."},
        503: {"description": "Engine loading or broken, shutting down, or generation failed."},
        504: {"description": "Not answered within PUNKS_REQUEST_TIMEOUT_S."},
    },
)
async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> Response:
    started = time.perf_counter()
    done = await service.submit(await engine_request(body.to_engine), request)
    if done is None:  # the client hung up: nobody reads this
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    as_png = _prefers_png(request.headers.get("accept", ""))
    encode_started = time.perf_counter()
    if as_png:
        images = await asyncio.to_thread(encode_images, done.result.images[:1], "png", False)
    else:
        images = await asyncio.to_thread(encode_images, done.result.images, body.output_format, body.return_sprites)
    timings = Timings(
        queue_wait_s=round(done.queue_wait_s, 4),
        pipeline_s=done.result.timings.get("pipeline_s", 0.0),
        postprocess_s=done.result.timings.get("postprocess_s", 0.0),
        encode_s=round(time.perf_counter() - encode_started, 4),
        total_s=round(time.perf_counter() - started, 4),
    )
    if as_png:
        return Response(images[0].image, media_type="image/png", headers=_png_headers(done, timings))
    payload = GenerateResponse.from_delivery(done.result, MEDIA_TYPES[body.output_format], images, timings)
    return Response(payload.model_dump_json(), media_type="application/json")


def _prefers_png(accept: str) -> bool:
    """True when the client ranks image/png above JSON: `Accept: image/png` does, `*/*` or none does not."""
    weights: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        weights[media.lower()] = quality
    png = weights.get("image/png", weights.get("image/*", 0.0))
    json = weights.get("application/json", weights.get("application/*", weights.get("*/*", 0.0)))
    return png > json


def _png_headers(done: Done, timings: Timings) -> dict[str, str]:
    image = done.result.images[0]
    quality = image.art.quality
    return {
        "X-Seed": str(image.seed),
        "X-Grid-Fit": f"{quality.grid_fit:.4f}",
        "X-Edge-Alignment": f"{quality.edge_alignment:.4f}",
        "X-Palette-Size": str(quality.palette_size),
        "X-Is-Pixel-Art": str(quality.is_pixel_art).lower(),
        "X-Prompt-Truncated": str(bool(done.result.dropped_words)).lower(),
        "Server-Timing": ", ".join(
            f"{name.removesuffix('_s')};dur={seconds * 1000:.1f}" for name, seconds in timings.model_dump().items()
        ),
    }
