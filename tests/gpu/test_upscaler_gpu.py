"""Real-ESRGAN on the GPU in fp16 (skipped without CUDA): RealESRGAN_x2plus's full architecture with random
weights upscales a 512 generation to 1024 with no NaN/inf, and prints how long it takes.

    python -m pytest tests/gpu/test_upscaler_gpu.py -q -s
"""

import importlib.util
import time

import numpy as np
import pytest
import torch
from PIL import Image

from service.upscale import load_upscaler
from tests.esrgan_files import save_realesrgan

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        importlib.util.find_spec("spandrel") is None, reason="pip install --no-deps -r requirements-upscale.txt"
    ),
]


def test_x2plus_fp16_512_to_1024_is_finite(tmp_path):
    upscaler = load_upscaler(save_realesrgan(tmp_path / "RealESRGAN_x2plus.pth"), "cuda", torch.float16)
    assert upscaler.dtype == torch.float16
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to("cuda", torch.float16) / 255
    with torch.inference_mode():
        raw = upscaler.descriptor.model(pixels)  # before spandrel's clamp, which would hide NaN as 0
    assert raw.shape == (1, 3, 1024, 1024) and torch.isfinite(raw).all()
    upscaler.upscale(image, 1024)  # warm-up (cuDNN algorithm choice)
    torch.cuda.synchronize()
    started = time.perf_counter()
    runs = 5
    for _ in range(runs):
        result = upscaler.upscale(image, 1024)
    torch.cuda.synchronize()
    print(
        f"\nRealESRGAN x2plus fp16 512->1024 on {torch.cuda.get_device_name()}: "
        f"{(time.perf_counter() - started) / runs * 1000:.0f} ms per image"
    )
    assert result.size == (1024, 1024) and 100 < np.asarray(result).mean() < 160
