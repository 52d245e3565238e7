"""Write synthetic kohya LoRA files (SD1.5, SDXL, wrong shapes, partial, empty) for the LoRA tests."""

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SD15_CROSS_ATTENTION = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SDXL_CROSS_ATTENTION = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"


def kohya_module(name: str, in_features: int, out_features: int, rank: int, alpha: float) -> dict[str, np.ndarray]:
    return {
        f"{name}.lora_down.weight": np.zeros((rank, in_features), np.float16),
        f"{name}.lora_up.weight": np.zeros((out_features, rank), np.float16),
        f"{name}.alpha": np.array(alpha, np.float16),
    }


def write_lora(
    path: Path,
    modules: dict[str, tuple[int, int]],
    rank: int = 32,
    alpha: float = 16.0,
    metadata: dict[str, str] | None = None,
) -> Path:
    """modules: kohya name -> (in_features, out_features)."""
    tensors = {}
    for name, (in_features, out_features) in modules.items():
        tensors |= kohya_module(name, in_features, out_features, rank, alpha)
    save_file(tensors, str(path), metadata=metadata)
    return path


def sd15_modules() -> dict[str, tuple[int, int]]:
    return {SD15_CROSS_ATTENTION: (768, 320), "lora_te_text_model_encoder_layers_0_mlp_fc1": (768, 3072)}


def sdxl_modules() -> dict[str, tuple[int, int]]:
    return {
        SDXL_CROSS_ATTENTION: (2048, 640),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (768, 3072),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": (1280, 5120),
    }


def sd15_full_modules() -> dict[str, tuple[int, int]]:
    """Every module of a full kohya SD1.5 LoRA (192 UNet + 72 text encoder)."""
    from service.lora.layout import sd15_modules

    return sd15_modules()


def sdxl_full_unet_sample() -> dict[str, tuple[int, int]]:
    """A few SDXL modules under kohya's SDXL names (input_blocks, te1/te2)."""
    return sdxl_modules() | {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": (2048, 1280),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }


def write_locon(path: Path, rank: int = 32, conv_rank: int = 8, metadata: dict[str, str] | None = None) -> Path:
    """A LoCon file: linear modules plus 3x3 conv modules (kohya's conv_dim) in the UNet resnets."""
    tensors = {}
    for name, (in_features, out_features) in sd15_full_modules().items():
        tensors |= kohya_module(name, in_features, out_features, rank, rank / 2)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors |= {
        f"{conv}.lora_down.weight": np.zeros((conv_rank, 320, 3, 3), np.float16),
        f"{conv}.lora_up.weight": np.zeros((320, conv_rank, 1, 1), np.float16),
        f"{conv}.alpha": np.array(1.0, np.float16),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path
