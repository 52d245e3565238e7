"""What every router of the HTTP service shares, as FastAPI dependencies: the service's state from loading to
shutdown (`ServiceDep`, `ReadyEngine`), the token check (`authorizer`), queueing a request (`Service.submit`), the
model names the OpenAI and A1111 routes offer, and the route class that answers every failure of a route in its
API's own error shape (`shaped_route`). The routers import this module; nothing here imports a router.
"""

import asyncio
import base64
import binascii
import hmac
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.batcher import CLIENT_GONE, Batcher, Done, GenerationFailed, QueueFull, ShuttingDown
from service.config import Settings
from service.engine import Engine, GenerationRequest
from service.errors import RequestError
from service.http.metrics import Metrics
from service.state import ServiceState

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]
RETRY_AFTER_S = "5"
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that hung up: nobody reads it, /metrics counts it
MODEL = "bespoke-punks"  # what the OpenAI and A1111 routes call the default LoRA


class Service:
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

    def broken(self) -> str | None:
        """Why this process can never serve again (None: it can, or will once loaded): liveness fails."""
        if self.load_error:
            return "the engine failed to load (see the server log)"  # the why (paths, files) is for operators
        if self.batcher is not None and not self.batcher.alive and not self.stopping:
            return "the generation worker stopped (see the server log)"
        return None

    @property
    def state(self) -> ServiceState:
        """unavailable() and broken() as a value, for code that compares (Ray readiness) rather than tells."""
        if self.stopping:
            return ServiceState.STOPPING
        if self.broken():
            return ServiceState.BROKEN
        return ServiceState.LOADING if self.batcher is None else ServiceState.READY

    def unavailable(self) -> str | None:
        """Why generation cannot be served now (None: it can): readiness fails. `state`, told."""
        state = self.state
        if state is ServiceState.STOPPING:
            return "the service is shutting down"
        if state is ServiceState.BROKEN:
            return self.broken()
        return "the engine is loading" if state is ServiceState.LOADING else None

    async def shutdown(self) -> None:
        """Refuse new work at once; give the queued work shutdown_timeout_s. Idempotent: the server calls it
        on SIGTERM (service/http/serve.py), the lifespan again at the end."""
        self.stopping = True
        if self._drain is None and self.batcher is not None:
            self._drain = asyncio.create_task(self.batcher.close(self.settings.shutdown_timeout_s))
        if self._drain is not None:
            await asyncio.shield(self._drain)

    async def submit(self, request: GenerationRequest, http: Request) -> Done | None:
        """Queue the request and map every way it can fail to its status code. None: the client hung up while
        it waited (a queued request then leaves the queue unrendered)."""
        engine = self.ready_engine()
        assert self.batcher is not None  # ready: loaded (load)
        try:
            engine.check_request(request)  # what only the loaded engine knows: LoRA names, upscaler
        except RequestError as error:
            raise invalid(error) from None
        submitted = asyncio.ensure_future(self.batcher.submit(request))
        hung_up = asyncio.ensure_future(_disconnected(http))
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                await asyncio.wait([submitted, hung_up], return_when=asyncio.FIRST_COMPLETED)
                if not submitted.done():
                    self.metrics.disconnects.inc()
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
            raise HTTPException(504, f"not answered within {self.settings.request_timeout_s:g}s") from None
        finally:
            hung_up.cancel()
            submitted.cancel()  # a no-op once done; on a timeout it takes the request out of the queue


def invalid(error: RequestError) -> RequestValidationError:
    """A RequestError as the validation error every API answers in its own shape (422 or 400 naming the field)."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", error.field), "msg": error.public_reason}])


async def engine_request(build: Callable[[], GenerationRequest]) -> GenerationRequest:
    """The engine's request made by `build` off the event loop (it may decode an input image), a RequestError
    raised as `invalid`'s validation error."""
    try:
        return await asyncio.to_thread(build)
    except RequestError as error:
        raise invalid(error) from None


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up. The body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_ready_engine(service: ServiceDep) -> Engine:
    return service.ready_engine()


ReadyEngine = Annotated[Engine, Depends(get_ready_engine)]


def authorizer(settings: Settings) -> Callable[..., None]:
    """The dependency every generating route takes. Without PUNKS_API_TOKEN: nothing to check, and no security
    scheme in the OpenAPI schema. With it: `Authorization: Bearer <token>`, or the token as the password of HTTP
    Basic auth (A1111's --api-auth, webuiapi's set_auth), compared in constant time."""
    if settings.api_token is None:

        def open_access() -> None:
            """No token configured."""

        return open_access
    expected = settings.api_token.get_secret_value().encode()
    bearer = HTTPBearer(auto_error=False, description="The value of PUNKS_API_TOKEN.")

    def authorize(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not hmac.compare_digest(presented_token(request.headers.get("authorization")), expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return authorize


def presented_token(authorization: str | None) -> bytes:
    """The token a request carries: a Bearer credential or a Basic password (any user name); b"" for none."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode("utf-8", "backslashreplace")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return b""
    return b""


def model_names(engine: Engine) -> list[str]:
    """What the OpenAI `model` and A1111 `sd_model_checkpoint` accept: MODEL (the default LoRA), then the others."""
    return [MODEL, *(name for name in engine.lora_names if name != MODEL)]


def lora_of_model(engine: Engine, model: object) -> str | None:
    """The engine's `lora` for a model name: None for the default (MODEL, its own name or none), a LoRA name;
    LookupError for any other."""
    if model in (None, "", MODEL, engine.default_lora):
        return None
    if isinstance(model, str) and model in engine.lora_names:
        return model
    raise LookupError(model)


def validation_response(errors: Sequence[Any]) -> JSONResponse:
    """422 with each error's type, field and message only. FastAPI's own handler echoes the offending input
    (and `ctx`), which fails on NaN, 1e400 or a lone surrogate: a 500 and a traceback instead of a 422."""
    detail = [
        {
            "type": str(item.get("type", "value_error")),
            "loc": [part if isinstance(part, int) else printable(str(part)) for part in item.get("loc", ())],
            "msg": printable(str(item.get("msg", ""))),
        }
        for item in errors
    ]
    return JSONResponse({"detail": detail}, 422)


def printable(text: str) -> str:
    """Text that encodes as UTF-8 (a lone surrogate in a field name becomes \\ud800)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


ErrorShape = Callable[[Exception], Response | None]


def shaped_route(shape: ErrorShape) -> type[APIRoute]:
    """A route class answering every failure of its routes through `shape` (an API's own error format): validation
    errors, HTTPExceptions (Starlette's base class: FastAPI's and Starlette's own), the API's own exceptions. `shape`
    returns None for an exception it does not know, which then propagates."""

    class ShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Any]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as error:
                    response = shape(error)
                    if response is None:
                        raise
                    return response

            return handle

    return ShapedRoute
