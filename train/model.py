"""The demo model: SD1.5's module layout (so kohya key names, the single-file converter, the LoRA guard and fuse
all apply unchanged) at small widths, so that the shipped fp16 files stay under 25 MB and a CPU draws a punk in
seconds. CLIP's 49,408-token embedding is most of the text encoder at this width."""

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from service.config import CLIP_VOCABULARY_SIZE, SD15_CONFIG_DIR

TEXT_WIDTH = 64
UNET_CHANNELS = (32, 64, 96, 96)
UNET_HEADS = 2  # diffusers' attention_head_dim of SD1.5's config is the number of heads
VAE_CHANNELS = (16, 32, 64, 64)


def text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCABULARY_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config)


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"),
        block_out_channels=UNET_CHANNELS,
        norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=UNET_HEADS,
    )


def vae() -> AutoencoderKL:
    return AutoencoderKL.from_config(
        AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"), block_out_channels=VAE_CHANNELS, norm_num_groups=8
    )


def pipeline(
    unet_model: UNet2DConditionModel, vae_model: AutoencoderKL, text: CLIPTextModel
) -> StableDiffusionPipeline:
    """The three trained models with SD1.5's tokenizer and the service's default sampler."""
    return StableDiffusionPipeline(
        vae=vae_model,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer"),
        unet=unet_model,
        scheduler=DPMSolverMultistepScheduler.from_pretrained(SD15_CONFIG_DIR / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
