"""Optional Real-ESRGAN upscaler: the raw 512 generation, upscaled smoothly to the delivered size.

The snapped sprite is upscaled with exact nearest-neighbour cells (lossless); this is for users who
also want a smooth, detailed 1024 image. RealESRGAN_x2plus / x4plus `.pth` files are loaded with
spandrel (either state-dict layout: raw or {"params_ema": ...}); spandrel is an optional extra
(requirements-upscale.txt) and is imported only when the upscaler is configured.
"""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.errors import WeightsError

INSTALL_HELP = "pip install --no-deps -r requirements-upscale.txt"
_TORCHVISION_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _import_spandrel() -> types.ModuleType:
    """Import spandrel, standing in for torchvision when it is absent.

    spandrel imports torchvision at package import for two architectures this service never uses
    (LaMa, RestoreFormer); ESRGAN does not need it, and PyPI's torchvision does not import beside the
    CPU torch used here. The stand-in lives only during the import; calling it raises.
    """
    if "spandrel" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return _plain_import()
    functional = types.ModuleType("torchvision.transforms.functional")

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed (needed only by spandrel's LaMa/RestoreFormer)")

    # Stand-in modules get their attributes through their namespace (mypy knows no attributes of a bare ModuleType).
    vars(functional).update(
        rotate=unavailable, normalize=unavailable, InterpolationMode=types.SimpleNamespace(BILINEAR="bilinear")
    )
    transforms = types.ModuleType("torchvision.transforms")
    vars(transforms).update(functional=functional)
    package = types.ModuleType("torchvision")
    vars(package).update(transforms=transforms)
    sys.modules.update(zip(_TORCHVISION_NAMES, (package, transforms, functional), strict=True))
    try:
        return _plain_import()
    finally:
        for name in _TORCHVISION_NAMES:
            sys.modules.pop(name, None)


def _plain_import() -> types.ModuleType:
    try:
        import spandrel
    except ImportError as error:
        raise WeightsError(
            f"upscaler=realesrgan needs spandrel, which is not installed ({error}): {INSTALL_HELP}"
        ) from None
    return spandrel


class Upscaler:
    """A loaded super-resolution model on the engine's device and dtype."""

    def __init__(self, descriptor, path: Path, device: torch.device, dtype: torch.dtype):
        self.descriptor = descriptor
        self.path = path
        self.device = device
        self.dtype = dtype

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.descriptor.architecture.name} x{self.scale} ({self.path.name}, {dtype})"

    @torch.inference_mode()
    def upscale(self, image: Image.Image, size: int) -> Image.Image:
        """Upscale by the model's factor, then (x4 models, other sizes) resize to size x size with Lanczos."""
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
        output = self.descriptor(pixels.to(self.device, self.dtype).div_(255))
        array = output[0].permute(1, 2, 0).float().mul_(255).round_().clamp_(0, 255).byte().cpu().numpy()
        result = Image.fromarray(array)
        return result if result.size == (size, size) else result.resize((size, size), Image.Resampling.LANCZOS)


def load_upscaler(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Upscaler:
    """Load a RealESRGAN .pth (or .safetensors); WeightsError naming the file when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"upscaler=realesrgan: {path} not found. "
            "Download it with `python -m service weights download --realesrgan` "
            "(or set PUNKS_REALESRGAN_WEIGHTS, or PUNKS_UPSCALER=nearest)"
        )
    spandrel = _import_spandrel()
    try:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    except Exception as error:  # unpickling and architecture detection fail in many ways
        raise WeightsError(
            f"{path}: not a usable RealESRGAN model ({type(error).__name__}: {str(error)[:300]}); "
            "expected RealESRGAN_x2plus.pth or RealESRGAN_x4plus.pth"
        ) from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise WeightsError(
            f"{path}: a {descriptor.architecture.name} {descriptor.purpose} model, not a super-resolution model"
        )
    if descriptor.input_channels != 3 or descriptor.output_channels != 3 or descriptor.scale < 2:
        raise WeightsError(
            f"{path}: {descriptor.input_channels}->{descriptor.output_channels} channels at x{descriptor.scale}; "
            "expected an RGB x2 or x4 upscaler"
        )
    supported = (
        dtype == torch.float32
        or (dtype == torch.float16 and descriptor.supports_half)
        or (dtype == torch.bfloat16 and descriptor.supports_bfloat16)
    )
    dtype = dtype if supported else torch.float32
    descriptor.to(device).to(dtype).eval()
    return Upscaler(descriptor, path, torch.device(device), dtype)
