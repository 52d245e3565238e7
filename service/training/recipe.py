"""The recipe that worked, as defaults, and the refusal of what failed (see the training analysis: the same 203
captioned punks gave a 9/10 LoRA at dim 32 / alpha 16 on SD1.5, photographs at dim 64, noisy pixels on SDXL).

Of the seed's run only the base, resolution, rank, alpha and epoch count are recorded; the rest are kohya's
sd-scripts defaults for an SD1.5 LoRA (AdamW, learning rate 1e-4 for the UNet and 5e-5 for the text encoder, a
constant schedule, batch 1).
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from service.lora.layout import SD15_DIM
from service.weights.files import WeightFileError, read_tensor_table

REFUSED_RANK = 64  # dim 64 gave photographs, 128 (SDXL) noisy pixels
MIN_RESOLUTION, MAX_RESOLUTION = 64, 1024  # 64: cells of 2-3 px; SD1.5 itself was trained at 512
SD15_CROSS_ATTENTION = 768
OTHER_FAMILIES = {1024: "SD2.x", 2048: "SDXL"}  # cross-attention width -> family (service/lora/inspect.py)
FINDING = (
    "in the training analysis the same 203 punks gave a 9/10 LoRA at rank 32 / alpha 16 on SD1.5, photographs at "
    "rank 64 and noisy pixels on SDXL at rank 128"
)


@dataclass(frozen=True)
class Recipe:
    rank: int = SD15_DIM
    alpha: float = 16.0
    epochs: int = 10
    batch_size: int = 1
    learning_rate: float = 1e-4  # UNet
    text_encoder_learning_rate: float = 5e-5
    resolution: int = 512  # sprites upscaled nearest: cells of 21 or 22 px
    seed: int = 0
    force: bool = False  # train what the seed's finding refuses (rank >= 64, a base that is not SD1.5)

    def check(self) -> None:
        """ValueError naming the setting that is out of range, or that failed in the seed's runs."""
        for name in ("rank", "epochs", "batch_size", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("alpha", "learning_rate", "text_encoder_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.resolution % 8 or not MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION:
            raise ValueError(
                f"resolution: must be a multiple of 8 (the VAE's downscale) from {MIN_RESOLUTION} to {MAX_RESOLUTION}, "
                f"got {self.resolution}"
            )
        if self.rank >= REFUSED_RANK and not self.force:
            raise ValueError(f"rank: {self.rank} refused: {FINDING}; pass force to train it anyway")

    def metadata(self) -> dict[str, str]:
        return {f"punks_{k}": str(v) for k, v in asdict(self).items()}


def check_base_model(path: Path, force: bool = False) -> None:
    """Refuse a base model that is not SD1.x, from its configs or its single file's tensor names alone (no
    weights are read). SDXL is refused even when forced: the trainer builds SD1.x pipelines. A model of SD1.x's
    layout at another width (the small test and demo models) is taken as SD1.x."""
    family = _family(path)
    if family == "SDXL":
        raise ValueError(f"base_model: {path} is an SDXL model; this trainer trains SD1.5 LoRAs ({FINDING})")
    if family != "SD1.x" and not force:
        raise ValueError(f"base_model: {path} is an {family} model, not SD1.5: {FINDING}; pass force to train it")


def _family(path: Path) -> str:
    if path.is_dir():
        try:
            index = json.loads((path / "model_index.json").read_text())
            unet = json.loads((path / "unet" / "config.json").read_text())
            scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"base_model: {path} is not a diffusers model folder ({error})") from None
        if "XL" in index.get("_class_name", "") or unet.get("addition_embed_type") or "text_encoder_2" in index:
            return "SDXL"
        width = unet.get("cross_attention_dim")
        if scheduler.get("prediction_type") == "v_prediction" and width == SD15_CROSS_ATTENTION:
            return "SD2.x (v-prediction)"
        return OTHER_FAMILIES.get(width, "SD1.x") if isinstance(width, int) else "unknown"
    if path.suffix == ".ckpt":  # a pickle is not opened to look; loading it with SD1.5's configs refuses the others
        return "SD1.x"
    try:
        names = read_tensor_table(path).tensors
    except WeightFileError as error:
        raise ValueError(f"base_model: {path}: {error}") from None
    if any(name.startswith("conditioner.embedders.") for name in names):
        return "SDXL"
    if any(name.startswith("cond_stage_model.model.") for name in names):  # OpenCLIP: SD2
        return "SD2.x"
    return "SD1.x" if any(name.startswith("cond_stage_model.transformer.") for name in names) else "unknown"
