"""HTTP API: `uvicorn service.http.app:app`, or `python -m service serve` (service/http/serve.py), which adds the
connection and header limits and starts the bounded drain as soon as SIGTERM arrives.

Thin on purpose: each API is a router (native.py, openai_images.py, a1111.py, the playground, the docs) over the
shared state and token check of deps.py; this module only puts them together with the middleware. The engine loads
in the background at start-up, so /healthz answers at once and /readyz says 503 until the model is in memory.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from service.config import Settings
from service.engine import Engine
from service.http import a1111, docs, native, openai_images, playground
from service.http.deps import EngineFactory, ErrorShape, Service, authorizer, validation_response
from service.http.middleware import BodyLimit, LoopbackHosts, RequestMetrics, SecurityHeaders

# The APIs with an error shape of their own, by path: what a middleware answers on their routes uses it too.
ADAPTER_SHAPES: tuple[tuple[tuple[str, ...], ErrorShape], ...] = (
    (("/v1/images/", "/v1/models"), openai_images.error_response),
    (("/sdapi/",), a1111.error_response),
)
# The routes that take an image (variations): their bodies may be up to PUNKS_MAX_IMAGE_BODY_BYTES.
IMAGE_PATHS = ("/v1/generate", "/v1/images/variations", "/sdapi/v1/img2img")
# Every API, and whether it takes the token check (PUNKS_API_TOKEN).
ROUTERS: tuple[tuple[APIRouter, bool], ...] = (
    (playground.router, False),  # the web page at / (service/http/static/); it asks for the token itself
    (docs.router, False),  # /docs, /redoc
    (native.operations, False),  # /healthz, /readyz, /metrics
    (native.router, True),  # POST /v1/generate, GET /v1/loras
    (openai_images.router, True),  # POST /v1/images/generations, GET /v1/models
    (a1111.router, True),  # POST /sdapi/v1/txt2img, GET /sdapi/v1/sd-models, ...
)


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The app loads nothing until its lifespan starts, so importing this module is cheap."""
    settings = settings or Settings()
    service = Service(settings)
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
        docs_url=None,  # served by docs.router from the app's own assets
        redoc_url=None,
        redirect_slashes=False,  # a redirect would echo the Host header into its Location
    )
    app.state.settings = settings
    app.state.shutdown = service.shutdown  # for the server, on SIGTERM (service/http/serve.py)
    app.state.service = service  # deps.get_service; a Ray Serve replica waits for readiness on it
    # Added innermost first: metrics see every answer (408/413/400 too); the security headers go on all of them.
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        respond=_error,
        image_paths=IMAGE_PATHS,
        max_image_bytes=settings.max_image_body_bytes,
    )
    if settings.trusted_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.trusted_hosts), www_redirect=False)
    elif settings.api_token is None:
        app.add_middleware(LoopbackHosts)
    app.add_middleware(RequestMetrics, metrics=service.metrics, routers=[app.router, *(r for r, _ in ROUTERS)])
    app.add_middleware(SecurityHeaders)
    # Starlette types every handler as taking any Exception; it calls these with their exception's type only.
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]

    token = [Depends(authorizer(settings))]
    for router, needs_token in ROUTERS:
        app.include_router(router, dependencies=token if needs_token else None)
    return app


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return validation_response(error.errors())


async def _http_error(request: Request, error: HTTPException) -> Response:
    """What no route answered (404 for an unknown path, 405 for a wrong method) in the shape of its path's API."""
    return _adapter_shaped(request.url.path, error) or await http_exception_handler(request, error)


def _error(path: str, status: int, kind: str, message: str, headers: dict[str, str]) -> Response:
    """What a middleware answers by itself (413, 408) in the shape of the API that `path` belongs to."""
    response = _adapter_shaped(path, HTTPException(status, message, headers))
    return response or JSONResponse({"detail": [{"type": kind, "loc": ["body"], "msg": message}]}, status, headers)


def _adapter_shaped(path: str, error: HTTPException) -> Response | None:
    """`error` in the shape of the adapter API (OpenAI, A1111) that `path` belongs to; None for the native API."""
    for prefixes, shape in ADAPTER_SHAPES:
        if path.startswith(prefixes) and (response := shape(error)) is not None:
            return response
    return None


app = create_app()
