"""Ray Serve application: `serve run service.http.ray_app:app` (or `serve run deploy/serve.yaml`).

The same FastAPI app, routes and schemas as `uvicorn service.http.app:app` (create_app), behind Serve's FastAPI
ingress. One replica = one engine: on a GPU node each replica reserves one GPU (Ray sets CUDA_VISIBLE_DEVICES,
so device auto/cuda is that GPU), without CUDA it runs on the CPU (the smoke model when there are no weights).
Requests are still grouped inside a replica by the existing batcher (service/batcher.py); Serve only spreads
them over replicas and scales their number with the ongoing requests (Settings.ray_*).

Settings are PUNKS_* environment variables as everywhere; the ones set where the application is built (and
`serve run ... key=value` arguments, e.g. ray_max_replicas=2) are forwarded to every replica's runtime_env.

Back-pressure: a replica holds at most ray_max_ongoing_requests (keep it at most max_queue, so the batcher's own
429 does not fire); further requests wait at Serve's proxy, at most ray_max_queued_requests per proxy; beyond it
the proxy answers 429 with `Retry-After: 5` and a plain-text body (the single process answers JSON
{"detail": ...}). A replica is routed requests only once its engine has loaded (the lifespan below waits), and
Serve's health check restarts one whose engine or generation worker broke.
"""

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from service.config import Settings
from service.http.app import create_app
from service.http.deps import RETRY_AFTER_S
from service.state import ServiceState

ENV_PREFIX = "PUNKS_"
REPLICA_HEADER = "X-Replica"  # which replica answered: the load generator and the tests count them
READY_POLL_S = 0.1


class PunksReplica:
    """One Serve replica: builds the app from the replica's own environment (Settings()) when it starts."""

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(Settings())
        _wait_for_engine(app)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_replica(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        self._app = app
        return app

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine failed to load or whose worker died is replaced."""
        if self._app is not None and (reason := self._app.state.service.broken()):
            raise RuntimeError(reason)


def _wait_for_engine(app: FastAPI) -> None:
    """Start-up ends once the engine is loaded (or failed): Serve routes no request to a replica still loading,
    so a replica the autoscaler adds does not answer 503 for its first minute."""
    startup = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
        async with startup(app_) as state:
            service = app_.state.service
            while service.state is ServiceState.LOADING:
                await asyncio.sleep(READY_POLL_S)
            if reason := service.broken():
                raise RuntimeError(reason)  # Serve marks the replica failed and retries it
            yield state

    app.router.lifespan_context = lifespan


def replica_gpus(settings: Settings) -> float:
    """GPUs each replica reserves: ray_num_gpus, else 1 on CUDA and 0 on the CPU."""
    if settings.ray_num_gpus is not None:
        return settings.ray_num_gpus
    if settings.device.startswith("cuda"):
        return 1.0
    if settings.device != "auto":
        return 0.0
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        return 1.0  # the driver (the head node) may have no GPU itself
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def deployment_options(settings: Settings, env: dict[str, str]) -> dict[str, Any]:
    """The Serve deployment's options, all from Settings (deploy/serve.yaml may override them per deployment)."""
    return {
        "name": "punks",
        "ray_actor_options": {
            "num_gpus": replica_gpus(settings),
            "num_cpus": settings.ray_num_cpus,
            "runtime_env": {"env_vars": env},
        },
        "autoscaling_config": AutoscalingConfig(
            min_replicas=settings.ray_min_replicas,
            initial_replicas=max(settings.ray_min_replicas, 1),
            max_replicas=max(settings.ray_max_replicas, settings.ray_min_replicas, 1),
            target_ongoing_requests=settings.ray_target_ongoing_requests,
        ),
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        "max_queued_requests": settings.ray_max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=float(RETRY_AFTER_S)),
        # the replica's own drain (PUNKS_SHUTDOWN_TIMEOUT_S) runs in the lifespan's shutdown; then the batch on
        # the GPU returns
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s + 10.0,
    }


def build_app(args: dict[str, str] | None = None) -> Application:
    """The application: `serve run service.http.ray_app:build_app ray_max_replicas=2` (args are Settings fields,
    lower case, as PUNKS_* variables without the prefix), or the ready-made `app` below."""
    env = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIX)}
    env |= {ENV_PREFIX + key.upper(): str(value) for key, value in (args or {}).items()}
    overrides: dict[str, Any] = {key.lower(): value for key, value in (args or {}).items()}
    settings = Settings(**overrides)  # the environment, then the arguments
    deployment = serve.deployment(**deployment_options(settings, env))(serve.ingress()(PunksReplica))
    return deployment.bind()


app = build_app()  # `serve run service.http.ray_app:app`: the settings of the environment it is run in
