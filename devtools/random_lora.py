"""Write kohya-format SD1.x LoRA files with random weights, for the smoke model, tests and benchmarks."""

import json

import torch
from diffusers import StableDiffusionPipeline

from service.lora.fuse import kohya_targets


def random_kohya_lora(
    pipe: StableDiffusionPipeline, rank: int = 32, alpha: float = 16.0, seed: int = 0, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA with random (non-zero) up weights, so that fusing it visibly changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in kohya_targets(pipe).items():
        out_features, in_features = module.weight.shape[:2]
        kernel = (1, 1) if isinstance(module, torch.nn.Conv2d) else ()
        tensors[f"{name}.lora_down.weight"] = torch.randn((rank, in_features, *kernel), generator=generator) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn((out_features, rank, *kernel), generator=generator) * scale
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return {k: v.to(torch.float16) for k, v in tensors.items()}


def kohya_metadata(rank: int, alpha: float, base_model_version: str = "sd_v1", **extra: str) -> dict[str, str]:
    """Training metadata laid out as kohya's sd-scripts writes it (all values are strings)."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": base_model_version,
        "ss_resolution": "(512, 512)",
        "ss_num_epochs": "10",
        "ss_epoch": "7",
        "ss_num_train_images": "203",
        "ss_output_name": "bespoke_punks_smoke",
        "ss_training_comment": "random smoke LoRA: not trained, images are noise",
        "ss_tag_frequency": json.dumps({"punks": {"pixel art": 203, "24x24": 203, "bespoke punk": 203}}),
        **extra,
    }
