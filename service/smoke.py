"""A tiny random-weight model with SD1.5's exact module layout, and a matching rank-32 kohya LoRA.

It lets every code path (folder and single-file loading, LoRA checks and fusing, generation,
post-processing, the servers) run on a CPU without downloading weights. Its images are noise.
Same block structure as SD1.5 (4 down/up blocks, 2 layers each, cross-attention in the first three,
CLIP text encoder with the real 49,408-token vocabulary), so kohya key names are the real ones.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from service.checkpoint import save_ldm_checkpoint
from service.kohya import kohya_metadata, random_kohya_lora
from service.paths import SD15_CONFIG_DIR

SMOKE_FOLDER = "stable-diffusion-v1-5"
SMOKE_SINGLE_FILE = "v1-5-smoke.safetensors"
SMOKE_LORA = "bespoke_punks.safetensors"
LORA_RANK, LORA_ALPHA = 32, 16.0
TEXT_WIDTH = 32

def build_smoke_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    base_unet = json.loads((SD15_CONFIG_DIR / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel(
        **{k: v for k, v in base_unet.items() if not k.startswith("_")}
        | {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8, "cross_attention_dim": TEXT_WIDTH, "attention_head_dim": 1}
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=8,
        sample_size=512,
    )
    text_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_WIDTH,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG_DIR / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_smoke_model(folder: Path) -> Path:
    """Build and save: a diffusers folder, the same weights as one LDM single file, and a rank-32 LoRA."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_smoke_pipeline()
    pipe.save_pretrained(folder / SMOKE_FOLDER, safe_serialization=True)
    save_ldm_checkpoint(pipe, folder / SMOKE_SINGLE_FILE, dtype=torch.float32)
    save_file(random_kohya_lora(pipe), str(folder / SMOKE_LORA), metadata=kohya_metadata(LORA_RANK, LORA_ALPHA))
    return folder


def ensure_smoke_model(folder: Path) -> Path:
    """Build the smoke model once; later runs reuse it."""
    if not (folder / SMOKE_LORA).is_file():
        save_smoke_model(folder)
    return folder
