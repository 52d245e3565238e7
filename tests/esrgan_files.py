"""Random-weight RealESRGAN files in the real release layout (basicsr RRDBNet key names), for the upscaler tests.

RealESRGAN_x2plus: num_feat 64, num_block 23, num_grow_ch 32, scale 2; x2 models pixel-unshuffle the input
first, so conv_first takes 12 channels (3 * 2 * 2). The release files store the weights under "params_ema".
"""

from pathlib import Path

import torch


def realesrgan_state_dict(
    scale: int = 2, num_block: int = 23, num_feat: int = 64, num_grow: int = 32, seed: int = 0
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    in_channels = 3 * {1: 16, 2: 4, 4: 1}[scale]
    shapes = {"conv_first": (num_feat, in_channels)}
    for block in range(num_block):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                shapes[f"body.{block}.rdb{rdb}.conv{conv}"] = (
                    num_grow if conv < 5 else num_feat,
                    num_feat + (conv - 1) * num_grow,
                )
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        shapes[name] = (num_feat, num_feat)
    shapes["conv_last"] = (3, num_feat)
    state = {}
    for name, (out_channels, in_channels) in shapes.items():
        std = 0.1 * (2 / (in_channels * 9)) ** 0.5  # basicsr's kaiming init scaled by 0.1
        state[f"{name}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * std
        state[f"{name}.bias"] = torch.zeros(out_channels)
    state["conv_last.bias"] += 0.5  # mid-grey output, so a broken (black or NaN) result is visible
    return state


def save_realesrgan(path: Path, layout: str = "params_ema", **arch) -> Path:
    """layout "params_ema" (the release files) or "raw" (a bare state dict)."""
    state = realesrgan_state_dict(**arch)
    torch.save({"params_ema": state} if layout == "params_ema" else state, path)
    return path
