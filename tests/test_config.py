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


def test_snap_processes_default_to_a_batch_on_cuda_and_none_on_cpu(monkeypatch):
    """Unset: one snap process per image of a batch where a GPU renders, none on a CPU; a set value wins."""
    assert Settings(device="cuda", max_batch_size=8).snap_process_count == 8
    assert Settings(device="cpu").snap_process_count == 0
    monkeypatch.setenv("PUNKS_SNAP_PROCESSES", "2")
    assert Settings(device="cuda").snap_process_count == 2 and Settings(device="cpu").snap_process_count == 2
    monkeypatch.setenv("PUNKS_SNAP_PROCESSES", "-1")
    with pytest.raises(ValidationError, match="snap_processes"):
        Settings()
