"""HTTP API: `uvicorn service.http.app:app`. Thin on purpose: parse the request, queue it for the engine
(service/batcher.py groups concurrent requests on the one GPU thread), encode the result.

The engine loads in the background at start-up, so /healthz answers at once and /readyz says 503
until the model is in memory. Per-request lora_scale is not offered: the LoRA is fused once at load.
Start it with `python -m service serve` (service/http/serve.py): that applies the connection limits and
starts the bounded drain as soon as SIGTERM arrives.
"""

import asyncio
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.batcher import CLIENT_GONE, Batcher, Done, GenerationFailed, QueueFull, ShuttingDown
from service.config import Settings
from service.delivery import MEDIA_TYPES, encode_images
from service.engine import Engine, GenerationRequest
from service.errors import RequestError
from service.http import a1111, openai_images, playground
from service.http.metrics import Metrics
from service.http.middleware import BodyLimit, RequestMetrics
from service.http.schemas import GenerateRequest, GenerateResponse, Timings

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]
RETRY_AFTER_S = "5"
PNG_RESPONSE = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody reads it, /metrics counts it
PATH_LIKE = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"]+){2,}[\\/]?")  # /a/b, C:\a\b: server paths


class _Service:
    """What the routes share: the engine's state from loading to shutdown."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None  # the exception's type only: its message may name server paths
        self.stopping = False
        self._drain: asyncio.Task | None = None
        self.gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="punks-gpu")

    async def load(self, factory: EngineFactory) -> None:
        try:
            engine = await asyncio.get_running_loop().run_in_executor(self.gpu_thread, factory)
        except Exception as error:
            log.exception("the engine failed to load")
            self.load_error = type(error).__name__
            return
        self.batcher = Batcher.for_engine(engine, self.metrics, self.gpu_thread, self.settings)
        self.engine = engine

    def ready_engine(self) -> Engine:
        """The loaded engine, or the 503 every generating route answers while it cannot serve."""
        reason = self.unavailable()
        if reason is not None:
            raise HTTPException(503, reason, headers={"Retry-After": RETRY_AFTER_S})
        assert self.engine is not None  # unavailable() said None: loaded
        return self.engine

    async def submit(self, request: GenerationRequest, http: Request) -> Done | None:
        """Queue a request exactly as /v1/generate does (the OpenAI and A1111 routes call this)."""
        return await _submit(self, request, http)

    def broken(self) -> str | None:
        """Why this process can never serve again (None: it can, or will once loaded): liveness fails."""
        if self.load_error:
            return "the engine failed to load (see the server log)"  # the why (paths, files) is for operators
        if self.batcher is not None and not self.batcher.alive and not self.stopping:
            return "the generation worker stopped (see the server log)"
        return None

    def unavailable(self) -> str | None:
        """Why generation cannot be served now (None: it can): readiness fails."""
        if self.stopping:
            return "the service is shutting down"
        if reason := self.broken():
            return reason
        if self.batcher is None:
            return "the engine is loading"
        return None

    async def shutdown(self) -> None:
        """Refuse new work at once; give the queued work shutdown_timeout_s. Idempotent: the server calls it
        on SIGTERM (service/http/serve.py), the lifespan again at the end."""
        self.stopping = True
        if self._drain is None and self.batcher is not None:
            self._drain = asyncio.create_task(self.batcher.close(self.settings.shutdown_timeout_s))
        if self._drain is not None:
            await asyncio.shield(self._drain)


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The app loads nothing until its lifespan starts, so importing this module is cheap."""
    settings = settings or Settings()
    service = _Service(settings)
    factory = engine_factory or (lambda: Engine.load(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(service.load(factory))
        yield
        service.stopping = True  # new requests get 503; the queued ones are answered within the bound
        loader.cancel()
        with suppress(asyncio.CancelledError):
            await loader
        await service.shutdown()
        if service.engine is not None:
            service.engine.close()
        service.gpu_thread.shutdown(wait=False, cancel_futures=True)  # a load still running ends with the process

    app = FastAPI(
        title="Bespoke Punks",
        summary="Text description -> 24x24 pixel-art punk, delivered as a 1024 px image.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.shutdown = service.shutdown  # for the server, on SIGTERM (service/http/serve.py)
    app.state.service = service  # a Ray Serve replica waits for readiness on it (service/http/ray_app.py)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=service.metrics, router=app.router)  # outermost: counts 408/413 too
    # Starlette types every handler as taking any Exception; it calls this one with RequestValidationError only.
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]

    if settings.api_token is None:

        def authorize() -> None:
            """No token configured: nothing to check, and no security scheme in the OpenAPI schema."""

    else:
        bearer = HTTPBearer(auto_error=False, description="The value of PUNKS_API_TOKEN.")
        expected = settings.api_token.get_secret_value().encode()

        # Another signature on purpose: FastAPI reads it, and only this variant takes (and documents) a token.
        def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # type: ignore[misc]
            given = credentials.credentials.encode() if credentials else b""
            if not hmac.compare_digest(given, expected):
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app.include_router(playground.router)  # the web page at / (service/http/static/)

    @app.get("/healthz", summary="Liveness: 503 once the engine failed to load or the generation worker died.")
    async def healthz() -> JSONResponse:
        if reason := service.broken():
            return JSONResponse({"status": "broken", "detail": reason}, 503)
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", summary="Readiness: 200 while requests can be served; 503 loading, broken or shutting down.")
    async def readyz() -> JSONResponse:
        reason = service.unavailable()
        if reason is not None:
            body = {"status": "unavailable", "detail": reason}
            if service.load_error:
                body["error"] = service.load_error  # the exception's type: the message is in the log
            return JSONResponse(body, 503, {"Retry-After": RETRY_AFTER_S})
        assert service.engine is not None  # unavailable() said None: loaded
        return JSONResponse({"status": "ready", "smoke_model": service.engine.is_smoke})

    @app.get("/v1/loras", summary="LoRA names a request may pick (field `lora`).", dependencies=[Depends(authorize)])
    async def loras() -> dict[str, object]:
        reason = service.unavailable()
        if reason is not None:
            raise HTTPException(503, reason, headers={"Retry-After": RETRY_AFTER_S})
        assert service.engine is not None  # unavailable() said None: loaded
        return {"default": service.engine.default_lora, "loras": service.engine.lora_names}

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
            408: {"description": "Body not received within PUNKS_BODY_TIMEOUT_S (the connection is closed)."},
            413: {"description": "Body larger than PUNKS_MAX_BODY_BYTES."},
            429: {"description": "Queue full; retry after Retry-After seconds."},
            503: {"description": "Engine loading or broken, shutting down, or generation failed."},
            504: {"description": "Not answered within PUNKS_REQUEST_TIMEOUT_S."},
        },
        dependencies=[Depends(authorize)],
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        started = time.perf_counter()
        done = await _submit(service, body.to_engine(), request)
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

    app.include_router(openai_images.router(service, authorize))  # POST /v1/images/generations, GET /v1/models
    app.include_router(a1111.router(service))  # POST /sdapi/v1/txt2img, GET /sdapi/v1/sd-models, ...
    return app


async def _submit(service: _Service, request: GenerationRequest, http: Request) -> Done | None:
    """Queue the request and map every way it can fail to its status code. None: the client hung up while
    it waited (a queued request then leaves the queue unrendered)."""
    reason = service.unavailable()
    if reason is not None:
        raise HTTPException(503, reason, headers={"Retry-After": RETRY_AFTER_S})
    assert service.engine is not None and service.batcher is not None  # available: loaded (_Service.load)
    try:
        service.engine.check_request(request)  # what only the loaded engine knows: LoRA names, upscaler
    except RequestError as error:
        message = _public_reason(service.engine, request, error)
        raise RequestValidationError([{"type": "value_error", "loc": ("body", error.field), "msg": message}]) from None
    submitted = asyncio.ensure_future(service.batcher.submit(request))
    hung_up = asyncio.ensure_future(_disconnected(http))
    try:
        async with asyncio.timeout(service.settings.request_timeout_s):
            await asyncio.wait([submitted, hung_up], return_when=asyncio.FIRST_COMPLETED)
            if not submitted.done():
                service.metrics.disconnects.inc()
                submitted.cancel(CLIENT_GONE)
                await asyncio.wait([submitted])  # it leaves the queue (and says why) before the answer
                return None
            return submitted.result()
    except QueueFull:
        raise HTTPException(429, "too many queued requests", headers={"Retry-After": RETRY_AFTER_S}) from None
    except ShuttingDown:
        raise HTTPException(503, "the service is shutting down", headers={"Retry-After": RETRY_AFTER_S}) from None
    except GenerationFailed as error:
        detail = f"generation failed ({error}); retry later"
        raise HTTPException(503, detail, headers={"Retry-After": RETRY_AFTER_S}) from None
    except TimeoutError:
        raise HTTPException(504, f"not answered within {service.settings.request_timeout_s:g}s") from None
    finally:
        hung_up.cancel()
        submitted.cancel()  # a no-op once done; on a timeout it takes the request out of the queue


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up. The body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _public_reason(engine: Engine, request: GenerationRequest, error: RequestError) -> str:
    """The engine's reason, minus what anonymous callers must not see (server paths)."""
    if error.field == "lora" and error.reason.startswith("unknown LoRA"):
        names = engine.lora_names
        return f"unknown LoRA; allowed: {', '.join(names)}" if names else "unknown LoRA; this server offers no others"
    return PATH_LIKE.sub("<path>", error.reason)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with each error's type, field and message only. FastAPI's own handler echoes the offending input
    (and `ctx`), which fails on NaN, 1e400 or a lone surrogate: a 500 and a traceback instead of a 422."""
    detail = [
        {
            "type": str(item.get("type", "value_error")),
            "loc": [part if isinstance(part, int) else _printable(str(part)) for part in item.get("loc", ())],
            "msg": _printable(str(item.get("msg", ""))),
        }
        for item in error.errors()
    ]
    return JSONResponse({"detail": detail}, 422)


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (a lone surrogate in a field name becomes \\ud800)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
