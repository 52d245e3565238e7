"""Session fixtures: the smoke model is built once per test session (it takes a few seconds)."""

import os
from pathlib import Path

import pytest

from devtools.smoke import save_smoke_model
from service.config import Settings

TEST_STEPS = 2  # enough to exercise the scheduler; the smoke model's images are noise anyway


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
        steps=TEST_STEPS,
        device="cpu",
    )


@pytest.fixture(scope="session")
def engine(smoke_settings: Settings):
    from service.engine import Engine

    return Engine.load(smoke_settings)
