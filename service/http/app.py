"""HTTP API: `uvicorn service.http.app:app`. Thin on purpose: parse the request, queue it for the engine
(service/batcher.py groups concurrent requests on the one GPU thread), encode the result.

The engine loads in the background at start-up, so /healthz answers at once and /readyz says 503
until the model is in memory. Per-request lora_scale is not offered: the LoRA is fused once at load.
"""

import asyncio
import base64
import hmac
import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.batcher import Batcher, Done, GenerationFailed, QueueFull, ShuttingDown
from service.config import Settings
from service.engine import Engine, GeneratedImage
from service.http.metrics import Metrics
from service.http.middleware import BodyLimit, RequestMetrics
from service.http.schemas import GenerateRequest, GenerateResponse, ImageOut, OutputFormat, Quality, Timings

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]
MEDIA_TYPES: dict[OutputFormat, str] = {"png": "image/png", "webp": "image/webp"}
RETRY_AFTER_S = "5"
PNG_RESPONSE = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}


class _Service:
    """What the routes share: the engine's state from loading to shutdown."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.stopping = False
        self.gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="punks-gpu")

    async def load(self, factory: EngineFactory) -> None:
        try:
            engine = await asyncio.get_running_loop().run_in_executor(self.gpu_thread, factory)
        except Exception as error:
            log.exception("the engine failed to load")
            self.load_error = f"{type(error).__name__}: {error}"
            return
        s = self.settings
        self.batcher = Batcher(
            engine.render, engine.finish, self.metrics, self.gpu_thread,
            max_images=s.max_batch_size, max_wait_s=s.max_batch_wait_ms / 1000, max_queue=s.max_queue,
            batch_sizes=s.batch_buckets if s.compile else None,  # compiled: other sizes are padded up
        )
        self.engine = engine

    def unavailable(self) -> str | None:
        """Why generation cannot be served now (None: it can)."""
        if self.stopping:
            return "the service is shutting down"
        if self.load_error:
            return "the engine failed to load"  # the why (paths, files) is for operators: /readyz and the log
        if self.batcher is None:
            return "the engine is loading"
        return None


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The app loads nothing until its lifespan starts, so importing this module is cheap."""
    settings = settings or Settings()
    service = _Service(settings)
    factory = engine_factory or (lambda: Engine.load(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(service.load(factory))
        yield
        service.stopping = True  # new requests get 503; the queued ones are still answered
        loader.cancel()
        with suppress(asyncio.CancelledError):
            await loader
        if service.batcher is not None:
            await service.batcher.close()
        service.gpu_thread.shutdown(wait=False, cancel_futures=True)  # a load still running ends with the process

    app = FastAPI(
        title="Bespoke Punks",
        summary="Text description -> 24x24 pixel-art punk, delivered as a 1024 px image.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: it also counts the 413s

    bearer = HTTPBearer(auto_error=False, description="Required when PUNKS_API_TOKEN is set.")

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.api_token is None:
            return
        expected = settings.api_token.get_secret_value().encode()
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz", summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: 200 once the engine is loaded, 503 before (or if loading failed).")
    async def readyz() -> JSONResponse:
        reason = service.unavailable()
        if reason is not None:
            body = {"status": "unavailable", "detail": reason}
            if service.load_error:
                body["error"] = service.load_error
            return JSONResponse(body, 503, {"Retry-After": RETRY_AFTER_S})
        return JSONResponse({"status": "ready", "smoke_model": service.engine.weights.is_smoke})

    @app.get("/v1/loras", summary="LoRA names a request may pick (field `lora`).", dependencies=[Depends(authorize)])
    async def loras() -> dict[str, object]:
        reason = service.unavailable()
        if reason is not None:
            raise HTTPException(503, reason, headers={"Retry-After": RETRY_AFTER_S})
        return {"default": service.engine.weights.lora.stem, "loras": service.engine.lora_names}

    @app.get("/metrics", summary="Prometheus metrics.", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/generate",
        summary="Generate punks from a description.",
        description="JSON with base64 images by default. With `Accept: image/png`: the first image's PNG bytes, "
        "its seed and quality signals in X-* headers (output_format and return_sprites are then ignored).",
        response_model=GenerateResponse,
        responses={
            200: PNG_RESPONSE,
            401: {"description": "Missing or wrong bearer token (when PUNKS_API_TOKEN is set)."},
            413: {"description": "Body larger than PUNKS_MAX_BODY_BYTES."},
            429: {"description": "Queue full; retry after Retry-After seconds."},
            503: {"description": "Engine loading, shutting down, or generation failed."},
            504: {"description": "Not answered within PUNKS_REQUEST_TIMEOUT_S."},
        },
        dependencies=[Depends(authorize)],
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        started = time.perf_counter()
        done = await _submit(service, body)
        as_png = _prefers_png(request.headers.get("accept", ""))
        encoding = "png" if as_png else body.output_format
        encode_started = time.perf_counter()
        images = done.result.images[:1] if as_png else done.result.images
        encoded = await asyncio.to_thread(_encode_all, images, encoding, body.return_sprites and not as_png)
        timings = Timings(
            queue_wait_s=round(done.queue_wait_s, 4),
            pipeline_s=done.result.timings.get("pipeline_s", 0.0),
            postprocess_s=done.result.timings.get("postprocess_s", 0.0),
            encode_s=round(time.perf_counter() - encode_started, 4),
            total_s=round(time.perf_counter() - started, 4),
        )
        if as_png:
            return Response(encoded[0].image_bytes, media_type="image/png", headers=_png_headers(done, timings))
        outputs = [
            ImageOut(
                seed=image.seed,
                image=_b64(blobs.image_bytes),
                sprite=_b64(blobs.sprite_bytes) if blobs.sprite_bytes else None,
                smooth=_b64(blobs.smooth_bytes) if blobs.smooth_bytes else None,
                palette=image.art.palette,
                quality=Quality(**image.art.quality.as_dict()),
            )
            for image, blobs in zip(images, encoded, strict=True)
        ]
        payload = GenerateResponse.build(done.result, MEDIA_TYPES[encoding], outputs, timings)
        return Response(payload.model_dump_json(), media_type="application/json")

    return app


async def _submit(service: _Service, body: GenerateRequest) -> Done:
    """Queue the request and map every way it can fail to its status code."""
    reason = service.unavailable()
    if reason is not None:
        raise HTTPException(503, reason, headers={"Retry-After": RETRY_AFTER_S})
    request = body.to_engine()
    try:
        service.engine.check_request(request)  # what only the loaded engine knows: LoRA names, upscaler
    except ValueError as error:
        field, _, reason = str(error).partition(": ")
        raise RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": reason, "input": None}]) from None
    try:
        async with asyncio.timeout(service.settings.request_timeout_s):
            return await service.batcher.submit(request)
    except QueueFull:
        raise HTTPException(429, "too many queued requests", headers={"Retry-After": RETRY_AFTER_S}) from None
    except ShuttingDown:
        raise HTTPException(503, "the service is shutting down", headers={"Retry-After": RETRY_AFTER_S}) from None
    except GenerationFailed as error:
        detail = f"generation failed ({error}); retry later"
        raise HTTPException(503, detail, headers={"Retry-After": RETRY_AFTER_S}) from None
    except TimeoutError:
        raise HTTPException(504, f"not answered within {service.settings.request_timeout_s:g}s") from None


@dataclass(frozen=True)
class _Encoded:
    image_bytes: bytes
    sprite_bytes: bytes | None
    smooth_bytes: bytes | None


def _encode_all(images: list[GeneratedImage], encoding: OutputFormat, sprites: bool) -> list[_Encoded]:
    return [
        _Encoded(
            _encode(image.art.image, encoding),
            _encode(image.art.sprite, encoding) if sprites else None,
            _encode(image.smooth, encoding) if image.smooth is not None else None,
        )
        for image in images
    ]


def _encode(image: Image.Image, encoding: OutputFormat) -> bytes:
    buffer = io.BytesIO()
    if encoding == "webp":
        image.save(buffer, "WEBP", lossless=True)  # lossy WebP would smear the flat cells
    else:
        image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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


app = create_app()
