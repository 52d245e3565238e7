"""The one settings object: environment variables and the checks that keep a bad deployment from starting."""

import pytest
from pydantic import ValidationError

from service.config import MAX_IMAGES, Settings


def test_settings_come_from_punks_environment_variables(monkeypatch):
    monkeypatch.setenv("PUNKS_STEPS", "12")
    monkeypatch.setenv("PUNKS_BATCH_BUCKETS", "[1, 4, 8]")
    settings = Settings()
    assert settings.steps == 12 and settings.batch_buckets == (1, 4, 8)


def test_compiled_buckets_must_hold_the_largest_batch():
    assert max(Settings(compile=True).batch_buckets) >= max(MAX_IMAGES, Settings().max_batch_size)
    with pytest.raises(ValidationError, match="batch_buckets: with compile the largest bucket must hold 8 images"):
        Settings(compile=True, max_batch_size=8, batch_buckets=(1, 2, 4))
    assert Settings(compile=False, max_batch_size=8, batch_buckets=(1, 2, 4)).max_batch_size == 8  # eager: any size
