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


def write_lora(path: Path, modules: dict[str, tuple[int, int]], rank: int = 32, alpha: float = 16.0,
               metadata: dict[str, str] | None = None) -> Path:
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
