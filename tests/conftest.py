"""Session fixtures: the smoke model is built once per test session (it takes a few seconds)."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.smoke import save_smoke_model
from service.config import Settings

TEST_STEPS = 2  # enough to exercise the scheduler; the smoke model's images are noise anyway

# Missing weights fall back to the random smoke model in every test, in this process and in the servers it starts,
# not to the trained demo model (the default): quicker, and the tests of the servers and the engine do not depend
# on what it draws. tests/test_demo_model.py asks for the demo model by name.
os.environ["PUNKS_FALLBACK_MODEL"] = "smoke"


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_smoke_model(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="session")
def smoke_env(smoke_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for subprocesses (CLI, uvicorn, cog server): no real weights, the prebuilt smoke model."""
    return os.environ | {
        "PUNKS_WEIGHTS_DIR": str(tmp_path_factory.mktemp("no-weights")),
        "PUNKS_SMOKE_DIR": str(smoke_dir),
        "PUNKS_STEPS": str(TEST_STEPS),
        "PUNKS_DEVICE": "cpu",
    }


@pytest.fixture(scope="session")
def smoke_settings(smoke_env: dict[str, str]) -> Settings:
    return Settings(
        weights_dir=Path(smoke_env["PUNKS_WEIGHTS_DIR"]),
        smoke_dir=Path(smoke_env["PUNKS_SMOKE_DIR"]),
        fallback_model="smoke",
        steps=TEST_STEPS,
        device="cpu",
        snap_processes=0,  # whatever PUNKS_SNAP_PROCESSES a test puts in the environment for its servers
    )


@pytest.fixture(scope="session")
def engine(smoke_settings: Settings):
    from service.engine import Engine

    return Engine.load(smoke_settings)


@pytest.fixture(scope="module")
def fast_engine(engine, smoke_settings: Settings):
    """The session's smoke engine (same pipeline, no reload) with the FAST settings (tests/live_server.py)."""
    from service.engine import Engine
    from tests.live_server import FAST

    return Engine(engine.pipe, Settings(**smoke_settings.model_dump() | FAST), engine.weights, engine.loras)


@pytest.fixture(scope="module")
def spy(fast_engine):
    """The fast engine behind a SpyEngine: the HTTP tests count, hold and fail its calls."""
    from tests.live_server import SpyEngine

    return SpyEngine(fast_engine)


@pytest.fixture(scope="module")
def live(spy, smoke_settings: Settings) -> Iterator[str]:
    """A real uvicorn in a thread serving the app over `spy`."""
    from tests.live_server import make_app, thread_server

    with thread_server(make_app(smoke_settings, lambda: spy)) as url:
        yield url
