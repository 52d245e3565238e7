"""The two renderings of a 24x24 sprite at the generation size, in torch (batched, on the GPU while training).

crisp: nearest-neighbour, as the real LoRA's training data was upscaled (at 512 px, cells of 21 or 22 px);
smooth: bilinear and then blurred, the soft "photographic" look the base model is trained on, so that the base
alone does not draw pixel art and the LoRA has something to change.
"""

import torch
import torch.nn.functional as F

BLUR_SIGMA_CELLS = 0.45  # gaussian blur of the smooth rendering, in cells


def to_tensor(sprites) -> torch.Tensor:
    """(N, 24, 24, 3) uint8 array -> (N, 3, 24, 24) float in [-1, 1]."""
    return torch.as_tensor(sprites).permute(0, 3, 1, 2).float() / 127.5 - 1


def crisp(sprites: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(sprites, size=(size, size), mode="nearest")


def smooth(sprites: torch.Tensor, size: int) -> torch.Tensor:
    image = F.interpolate(sprites, size=(size, size), mode="bilinear", align_corners=False)
    sigma = BLUR_SIGMA_CELLS * size / sprites.shape[-1]
    radius = int(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, device=sprites.device, dtype=sprites.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    return F.conv2d(F.pad(image, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
