"""The optional Real-ESRGAN upscaler: spandrel loads the release layouts (no torchvision needed), wrong files
fail at start-up naming the file, and the engine delivers the smooth image next to the sprite."""

import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine import Engine, GenerationRequest
from service.errors import WeightsError
from service.upscale import load_upscaler
from tests.conftest import TEST_STEPS
from tests.esrgan_files import save_realesrgan

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("spandrel") is None,
    reason="optional extra: pip install --no-deps -r requirements-upscale.txt",
)


@pytest.fixture(scope="module")
def x2plus(tmp_path_factory) -> Path:
    """RealESRGAN_x2plus's full architecture (23 blocks) with random weights, in the release layout."""
    return save_realesrgan(tmp_path_factory.mktemp("esrgan") / "RealESRGAN_x2plus.pth")


def gradient(size: int) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), -1))


def test_full_x2plus_in_both_layouts_upscales_2x(x2plus: Path, tmp_path: Path):
    raw = save_realesrgan(tmp_path / "raw.pth", layout="raw")
    for path in (x2plus, raw):
        upscaler = load_upscaler(path)
        assert upscaler.scale == 2 and upscaler.dtype == torch.float32
        assert "ESRGAN x2" in upscaler.describe()
        started = time.perf_counter()
        result = upscaler.upscale(gradient(64), 128)
        print(f"x2plus 64->128 on CPU: {time.perf_counter() - started:.2f}s")
        assert result.size == (128, 128) and result.mode == "RGB"
        assert 100 < np.asarray(result).mean() < 160  # conv_last's 0.5 bias: grey, not black (NaN) or clipped
    assert "torchvision" not in sys.modules  # the stand-in for spandrel's unused imports is gone again


def test_x4_model_is_resized_to_the_requested_size(tmp_path: Path):
    upscaler = load_upscaler(save_realesrgan(tmp_path / "x4.pth", scale=4, num_block=1))
    assert upscaler.scale == 4
    assert upscaler.upscale(gradient(32), 64).size == (64, 64)  # 128 from the model, Lanczos down to 64


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a usable RealESRGAN model"),
        (b"\x80\x04garbage that is no pickle", "not a usable RealESRGAN model"),
        ({"some.other.weight": torch.zeros(3, 3)}, "not a usable RealESRGAN model"),
    ],
)
def test_wrong_or_corrupt_file_names_the_file(tmp_path: Path, content, message: str):
    path = tmp_path / "RealESRGAN_x2plus.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=message) as error:
        load_upscaler(path)
    assert str(path) in str(error.value)


def test_truncated_release_file_is_an_error(x2plus: Path, tmp_path: Path):
    path = tmp_path / "cut.pth"
    path.write_bytes(x2plus.read_bytes()[: x2plus.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.pth: not a usable RealESRGAN model"):
        load_upscaler(path)


def test_missing_file_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(WeightsError, match=r"nope\.pth not found.*weights download --realesrgan"):
        load_upscaler(tmp_path / "nope.pth")


def test_spandrel_not_installed_is_a_clear_error(x2plus: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # makes `import spandrel` raise ImportError
    with pytest.raises(WeightsError, match=r"needs spandrel, which is not installed.*requirements-upscale\.txt"):
        load_upscaler(x2plus)


@pytest.fixture(scope="module")
def small_x2(tmp_path_factory) -> Path:
    return save_realesrgan(tmp_path_factory.mktemp("esrgan-small") / "x2.pth", num_block=1)


def test_engine_delivers_the_smooth_image_when_configured(smoke_settings, small_x2: Path):
    settings = smoke_settings.model_copy(
        update={"upscaler": "realesrgan", "realesrgan_weights": small_x2, "warmup": False}
    )
    engine = Engine.load(settings)
    assert engine.upscaler is not None and engine.upscaler.scale == 2
    result = engine.generate(
        GenerationRequest("lad with a red beanie", seed=1, num_outputs=2, num_inference_steps=TEST_STEPS)
    )
    for image in result.images:
        assert image.smooth is not None and image.smooth.size == (1024, 1024)
        assert image.art.image.size == (1024, 1024)  # the snapped sprite is still delivered
    assert result.timings["upscale_s"] > 0
    plain = engine.generate(GenerationRequest("lad", seed=1, num_inference_steps=TEST_STEPS, upscaler="nearest"))
    assert plain.images[0].smooth is None and "upscale_s" not in plain.timings


def test_engine_fails_at_start_naming_a_corrupt_upscaler(smoke_settings, tmp_path: Path):
    corrupt = tmp_path / "RealESRGAN_x2plus.pth"
    corrupt.write_bytes(b"not a model")
    settings = smoke_settings.model_copy(update={"upscaler": "realesrgan", "realesrgan_weights": corrupt})
    with pytest.raises(WeightsError, match=str(corrupt)):
        Engine.load(settings)


def test_request_for_realesrgan_without_it_loaded_is_refused(engine):
    assert engine.upscaler is None
    with pytest.raises(ValueError, match="upscaler: realesrgan is not enabled"):
        engine.generate(GenerationRequest("lad", seed=1, upscaler="realesrgan"))
    with pytest.raises(ValueError, match="upscaler: must be one of nearest, realesrgan"):
        dataclasses.replace(GenerationRequest("lad"), upscaler="bicubic").check()
