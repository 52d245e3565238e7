"""The serving state as a value (service/state.py), as the HTTP app's service reports it from loading to shutdown;
Ray readiness (service/http/ray_app.py) waits on it instead of comparing a message."""

from types import SimpleNamespace

from service.config import Settings
from service.http.deps import Service
from service.state import ServiceState


def test_state_follows_the_service_from_loading_to_stopping():
    service = Service(Settings(device="cpu"))
    try:
        assert service.state is ServiceState.LOADING and service.unavailable() is not None
        service.batcher = SimpleNamespace(alive=True)  # type: ignore[assignment]  # loaded: a live batcher
        assert service.state is ServiceState.READY and service.unavailable() is None
        service.batcher = SimpleNamespace(alive=False)  # type: ignore[assignment]  # its worker died
        assert service.state is ServiceState.BROKEN and service.broken() is not None
        service.stopping = True  # a stopped batcher while shutting down is not broken
        assert service.state is ServiceState.STOPPING
    finally:
        service.gpu_thread.shutdown()


def test_a_failed_load_is_broken_whatever_the_batcher():
    service = Service(Settings(device="cpu"))
    try:
        service.load_error = "OSError"
        assert service.state is ServiceState.BROKEN
    finally:
        service.gpu_thread.shutdown()
