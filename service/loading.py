"""Find, load and check the weights: SD1.5 (diffusers folder or single file) and the kohya LoRA.

Everything here fails at start-up with a message that names the missing or wrong file and where
the right one goes, so that a bad deployment never turns into bad images.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from peft.tuners.lora import LoraLayer

from service.config import Settings
from service.errors import WeightsError
from service.lora import LoraError, LoraInfo, check_sd15_lora, inspect_lora
from service.paths import SD15_CONFIG_DIR
from service.kohya import kohya_targets
from service.smoke import SMOKE_FOLDER, SMOKE_LORA, ensure_smoke_model

log = logging.getLogger(__name__)

CLIP_VOCABULARY_SIZE = 49408
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
ADAPTER_NAME = "bespoke_punks"
SCHEDULERS = {  # config.Scheduler's names
    "dpm++": DPMSolverMultistepScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
}
WEIGHTS_HELP = (
    "Put SD1.5 at {weights}/stable-diffusion-v1-5/ (diffusers folder) or {weights}/v1-5-pruned-emaonly.safetensors, "
    "and the dim-32 LoRA at {weights}/bespoke_punks.safetensors (or set PUNKS_BASE_MODEL / PUNKS_LORA). "
    "With internet: `python -m service weights download`; to check: `python -m service weights check`."
)


@dataclass(frozen=True)
class WeightsSource:
    base_model: Path
    lora: Path
    is_smoke: bool
    config_dir: Path  # diffusers configs used for a single-file checkpoint


def resolve_weights(settings: Settings) -> WeightsSource:
    """Pick real weights when present; else the smoke model (if allowed), announced loudly."""
    help_text = WEIGHTS_HELP.format(weights=settings.weights_dir)
    base = next((p for p in settings.base_model_candidates() if p.exists()), None)
    lora = settings.lora_path()
    if base is not None and lora.is_file():
        return WeightsSource(base_model=base, lora=lora, is_smoke=False, config_dir=SD15_CONFIG_DIR)
    missing = [str(p) for p in settings.base_model_candidates()] if base is None else []
    missing += [] if lora.is_file() else [str(lora)]
    explicitly_configured = settings.base_model is not None or settings.lora is not None
    if explicitly_configured or not settings.allow_smoke_model:
        raise WeightsError(f"missing weights: {' / '.join(missing)}. {help_text}")
    log.warning(
        "=" * 78 + "\nNO REAL WEIGHTS (%s not found): using the tiny RANDOM smoke model.\n"
        "Its images are NOT meaningful. %s\n" + "=" * 78,
        ", ".join(missing),
        help_text,
    )
    folder = ensure_smoke_model(settings.smoke_dir)
    return WeightsSource(
        base_model=folder / SMOKE_FOLDER, lora=folder / SMOKE_LORA, is_smoke=True, config_dir=folder / SMOKE_FOLDER
    )


def folder_variant(path: Path) -> str | None:
    """'fp16' when the folder's weight files are all `*.fp16.*` (what `weights download` fetches): diffusers
    only loads those when asked for the variant. With full-precision files present, those are used."""
    weights = [f for pattern in ("*/*.safetensors", "*/*.bin") for f in path.glob(pattern)]
    return "fp16" if weights and all(f.name.split(".")[-2] == "fp16" for f in weights) else None


def load_base_pipeline(path: Path, config_dir: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Load SD1.5 offline from a diffusers folder or a single checkpoint file, and check its tokenizer."""
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise WeightsError(f"{path} is not a diffusers folder: model_index.json is missing")
            pipe = StableDiffusionPipeline.from_pretrained(
                path, dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False,
                feature_extractor=None, variant=folder_variant(path),  # the safety checker's; not downloaded
            )
        elif path.suffix in SINGLE_FILE_SUFFIXES:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config_dir), dtype=dtype, local_files_only=True,
                safety_checker=None, requires_safety_checker=False,
            )
        else:
            raise WeightsError(f"{path}: expected a diffusers folder or a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if isinstance(error, WeightsError):
            raise
        raise WeightsError(f"could not load SD1.5 from {path}: {error}") from error
    if len(pipe.tokenizer) != CLIP_VOCABULARY_SIZE:
        raise WeightsError(
            f"{path}: tokenizer has {len(pipe.tokenizer)} entries, SD1.5's CLIP tokenizer has {CLIP_VOCABULARY_SIZE}; "
            f"copy {SD15_CONFIG_DIR / 'tokenizer'} into the model's tokenizer/ folder"
        )
    return pipe


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> None:
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)


def check_lora_matches_model(pipe: StableDiffusionPipeline, info: LoraInfo) -> None:
    """Every module in the file must exist in the model with the same shape (diffusers only warns)."""
    targets = kohya_targets(pipe)
    unknown = sorted(set(info.modules) - set(targets))
    if unknown:
        raise LoraError(
            f"{info.path}: {len(unknown)} of {len(info.modules)} LoRA modules match no layer of the SD1.5 model "
            f"(first: {unknown[0]}); it was trained for another model ({info.describe()})"
        )
    for name, module in info.modules.items():
        out_features, in_features = targets[name].weight.shape[:2]
        if (module.in_features, module.out_features) != (in_features, out_features):
            raise LoraError(
                f"{info.path}: {name} is {module.in_features}->{module.out_features} but the model's layer is "
                f"{in_features}->{out_features}; this LoRA was trained for another base model ({info.describe()})"
            )


def count_lora_layers(pipe: StableDiffusionPipeline) -> int:
    return sum(isinstance(m, LoraLayer) for model in (pipe.unet, pipe.text_encoder) for m in model.modules())


def fuse_lora(pipe: StableDiffusionPipeline, path: Path, scale: float, expected_rank: int) -> LoraInfo:
    """Check, load, verify every module was injected, fuse at `scale`, and drop the adapter wrappers.

    Unfused LoRA wrappers make each UNet step much slower, so nothing of them may stay behind.
    """
    info = inspect_lora(path)
    for warning in check_sd15_lora(info, expected_rank):
        log.warning(warning)
    check_lora_matches_model(pipe, info)
    pipe.load_lora_weights(str(path), adapter_name=ADAPTER_NAME)
    injected = count_lora_layers(pipe)
    if injected != len(info.modules):
        raise LoraError(f"{path}: only {injected} of {len(info.modules)} LoRA modules were injected into the model")
    pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()
    if count_lora_layers(pipe):
        raise RuntimeError("LoRA adapter wrappers are still present after fusing")
    return info
