"""Kohya's SD1.x LoRA layout in torch terms: which layers it wraps, and how to write such a file."""

import json

import torch
from diffusers import StableDiffusionPipeline

# Modules kohya's networks.lora wraps in SD1.x: every Linear / 1x1 Conv inside these blocks.
UNET_LORA_PARENTS = ("Transformer2DModel",)
TEXT_LORA_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_targets(pipe: StableDiffusionPipeline) -> dict[str, torch.nn.Module]:
    """kohya name -> module for every layer a kohya SD1.x LoRA wraps."""
    targets = {}
    for prefix, model, parents in (("lora_unet", pipe.unet, UNET_LORA_PARENTS), ("lora_te", pipe.text_encoder, TEXT_LORA_PARENTS)):
        for parent_name, parent in model.named_modules():
            if type(parent).__name__ not in parents:
                continue
            for child_name, child in parent.named_modules():
                is_linear = isinstance(child, torch.nn.Linear)
                is_pointwise_conv = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
                if child_name and (is_linear or is_pointwise_conv):
                    targets[f"{prefix}_{_kohya_path(prefix, parent_name, child_name)}"] = child
    return targets


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


def _kohya_path(prefix: str, parent_name: str, child_name: str) -> str:
    """kohya names CLIP layers from CLIPTextModel's old text_model.* paths, which transformers 5 dropped."""
    path = f"{parent_name}.{child_name}"
    if prefix == "lora_te" and not path.startswith("text_model."):
        path = "text_model." + path
    return path.replace(".", "_")
