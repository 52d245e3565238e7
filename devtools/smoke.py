"""A tiny random-weight model with SD1.5's exact module layout, and a matching rank-32 kohya LoRA.

It lets every code path (folder and single-file loading, LoRA checks and fusing, generation,
post-processing, the servers) run on a CPU without downloading weights. Its images are noise.
Same block structure as SD1.5 (4 down/up blocks, 2 layers each, cross-attention in the first three,
CLIP text encoder with the real 49,408-token vocabulary), so kohya key names are the real ones.
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from devtools.checkpoint import save_ldm_checkpoint
from devtools.random_lora import kohya_metadata, random_kohya_lora
from service.config import CLIP_VOCABULARY_SIZE, SD15_CONFIG_DIR, Settings

SMOKE_FOLDER = "stable-diffusion-v1-5"
SMOKE_SINGLE_FILE = "v1-5-smoke.safetensors"
SMOKE_LORA = "bespoke_punks.safetensors"
LORA_RANK, LORA_ALPHA = 32, 16.0
TEXT_WIDTH = 32


def _pipeline(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG_DIR / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_smoke_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5's layout at a tiny width (one attention head, so 64x64-token attention stays cheap on a CPU)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"),
        block_out_channels=(32, 32, 64, 64),
        norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=1,
    )
    vae = AutoencoderKL.from_config(
        AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"), block_out_channels=(16, 16, 32, 32), norm_num_groups=8
    )
    text_config = CLIPTextConfig(
        vocab_size=CLIP_VOCABULARY_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_WIDTH,
    )
    return _pipeline(unet, vae, CLIPTextModel(text_config))


def build_full_size_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5's real architecture and sizes (UNet 860M, CLIP ViT-L/14 text encoder, SD VAE), random weights.

    For GPU benchmarks: speed and memory do not depend on the weights' values.
    """
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 1B parameters is slow on CPU
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    return _pipeline(unet, vae, text_encoder).to("cpu")


def save_random_model(folder: Path, pipe: StableDiffusionPipeline, single_file: bool = True) -> Path:
    """Save in weights/ layout: a diffusers folder, the same weights as one LDM single file, a rank-32 LoRA."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder / SMOKE_FOLDER, safe_serialization=True)
    if single_file:
        save_ldm_checkpoint(pipe, folder / SMOKE_SINGLE_FILE, dtype=pipe.unet.dtype)
    save_file(random_kohya_lora(pipe), str(folder / SMOKE_LORA), metadata=kohya_metadata(LORA_RANK, LORA_ALPHA))
    return folder


def save_smoke_model(folder: Path) -> Path:
    return save_random_model(folder, build_smoke_pipeline())


def ensure_smoke_model(folder: Path) -> Path:
    """Build the smoke model once; later runs reuse it."""
    if not (folder / SMOKE_LORA).is_file():
        save_smoke_model(folder)
    return folder


if __name__ == "__main__":
    cli = argparse.ArgumentParser(
        prog="python -m devtools.smoke", description="Build and save the tiny random smoke model and its LoRA."
    )
    cli.add_argument("--dir", type=Path, default=Settings().smoke_dir)
    print(save_smoke_model(cli.parse_args().dir))
