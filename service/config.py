"""One settings object for every surface. Each field is an environment variable prefixed PUNKS_
(for example PUNKS_WEIGHTS_DIR, PUNKS_LORA_SCALE); the defaults below are the documented ones."""

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SCHEDULERS = ("dpm++", "euler_a", "euler", "ddim", "pndm")
Scheduler = Literal["dpm++", "euler_a", "euler", "ddim", "pndm"]

# Bounds shared by every surface (CLI, FastAPI, Cog) so they reject the same inputs.
MIN_STEPS, MAX_STEPS = 1, 100
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 20.0
MAX_IMAGES = 4
MAX_PROMPT_CHARS = 500
MIN_LORA_SCALE, MAX_LORA_SCALE = 0.0, 2.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PUNKS_", frozen=True)

    weights_dir: Path = Field(Path("weights"), description="Folder holding the base model and the LoRA.")
    base_model: Path | None = Field(
        None,
        description="SD1.5 diffusers folder or single .safetensors/.ckpt file. "
        "Default: weights_dir/stable-diffusion-v1-5 (folder) or weights_dir/v1-5-pruned-emaonly.safetensors.",
    )
    lora: Path | None = Field(None, description="Kohya LoRA file. Default: weights_dir/bespoke_punks.safetensors.")
    lora_scale: float = Field(1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE, description="Strength the LoRA is fused at.")
    expected_lora_rank: int = Field(32, description="The rank that worked (dim 32 / alpha 16); others only warn.")
    allow_smoke_model: bool = Field(
        True, description="With no real weights, fall back (loudly) to the tiny random smoke model."
    )
    smoke_dir: Path = Field(Path(".cache/smoke-model"), description="Where the smoke model is built and kept.")
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cuda', 'cuda:1', 'cpu'.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="'auto': float16 on CUDA, float32 on CPU."
    )
    steps: int = Field(25, ge=MIN_STEPS, le=MAX_STEPS, description="Default denoising steps.")
    guidance: float = Field(7.5, ge=MIN_GUIDANCE, le=MAX_GUIDANCE, description="Default classifier-free guidance.")
    scheduler: Scheduler = Field("dpm++", description="Sampler: " + ", ".join(SCHEDULERS) + ".")
    generation_size: int = Field(512, description="SD1.5 resolution the LoRA was trained at.")
    grid: int = Field(24, description="Cells per side of the sprite.")
    output_size: int = Field(1024, ge=24, le=4096, description="Side of the delivered PNG.")
    integer_scale: bool = Field(
        False, description="Deliver floor(output_size/grid) px cells (1008 for 1024) instead of 42/43 px cells."
    )
    max_colors: int | None = Field(None, ge=2, le=256, description="Optional cap on the sprite's palette.")

    @cached_property
    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @cached_property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.torch_device.startswith("cuda") else "float32"

    def base_model_candidates(self) -> list[Path]:
        if self.base_model is not None:
            return [self.base_model]
        return [
            self.weights_dir / "stable-diffusion-v1-5",
            self.weights_dir / "v1-5-pruned-emaonly.safetensors",
        ]

    def lora_path(self) -> Path:
        return self.lora if self.lora is not None else self.weights_dir / "bespoke_punks.safetensors"
