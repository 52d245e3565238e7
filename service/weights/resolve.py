"""Which weights to load: the configured SD1.5 + LoRA files, or (allowed on development machines only) the
small demo model trained on generated portraits or the tiny random smoke model, announced loudly. A missing file
fails here, at start-up, naming it and where it goes.
Also which files of a diffusers folder are loaded (its fp16 variant or the full-precision files), the one answer
start-up and `weights check` share. Torch-free, so that `weights check` stays quick."""

import logging
from dataclasses import dataclass
from pathlib import Path

from service.config import LORA_FILE, SD15_CONFIG_DIR, SD15_FILE, SD15_FOLDER, Settings
from service.errors import WeightsError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")  # safetensors first, as diffusers prefers them
FP16_VARIANT = "fp16"
WEIGHTS_HELP = (
    f"Put SD1.5 at {{weights}}/{SD15_FOLDER}/ (diffusers folder) or {{weights}}/{SD15_FILE}, "
    f"and the dim-32 LoRA at {{weights}}/{LORA_FILE} (or set PUNKS_BASE_MODEL / PUNKS_LORA). "
    "With internet: `python -m service weights download`; to check: `python -m service weights check`."
)
DEMO_NOTE = "demo model trained on generated portraits; put SD1.5 + your LoRA in weights/ for the real thing"


@dataclass(frozen=True)
class WeightsSource:
    base_model: Path
    lora: Path
    is_smoke: bool
    config_dir: Path  # diffusers configs used for a single-file checkpoint
    is_demo: bool = False  # the small demo model trained on generated portraits (devtools/demo.py)


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
    if settings.fallback_model == "demo" and (demo := _demo_weights()) is not None:
        log.warning(
            "=" * 78 + "\nNO REAL WEIGHTS (%s not found): using the DEMO model,\n%s.\n%s\n" + "=" * 78,
            ", ".join(missing),
            DEMO_NOTE,
            help_text,
        )
        return demo
    log.warning(
        "=" * 78 + "\nNO REAL WEIGHTS (%s not found): using the tiny RANDOM smoke model.\n"
        "Its images are NOT meaningful. %s\n" + "=" * 78,
        ", ".join(missing),
        help_text,
    )
    try:
        from devtools.smoke import SMOKE_FOLDER, SMOKE_LORA, ensure_smoke_model  # not in the GPU images
    except ImportError:
        raise WeightsError(
            f"missing weights: {' / '.join(missing)} (and no smoke model in this install). {help_text}"
        ) from None
    folder = ensure_smoke_model(settings.smoke_dir)
    return WeightsSource(
        base_model=folder / SMOKE_FOLDER, lora=folder / SMOKE_LORA, is_smoke=True, config_dir=folder / SMOKE_FOLDER
    )


def _demo_weights() -> WeightsSource | None:
    """The shipped demo model; None where it is absent (the GPU images have no devtools/)."""
    try:
        from devtools.demo import DEMO_DIR, DEMO_FOLDER, DEMO_LORA, demo_model_present
    except ImportError:
        return None
    if not demo_model_present():
        return None
    folder = DEMO_DIR / DEMO_FOLDER
    return WeightsSource(base_model=folder, lora=DEMO_DIR / DEMO_LORA, is_smoke=False, config_dir=folder, is_demo=True)


def file_variant(path: Path) -> str | None:
    """diffusers' variant of a weight file: 'fp16' for model.fp16.safetensors, None for model.safetensors."""
    parts = path.name.split(".")
    return parts[-2] if len(parts) > 2 else None


def folder_variant(folder: Path) -> str | None:
    """'fp16' when the folder's weight files are all `*.fp16.*` (what `weights download` fetches): diffusers
    only loads those when asked for the variant. With full-precision files present, those are used."""
    weights = [f for pattern in WEIGHT_FILE_PATTERNS for f in folder.glob(f"*/{pattern}")]
    return FP16_VARIANT if weights and all(file_variant(f) == FP16_VARIANT for f in weights) else None


def model_weights(model_folder: Path, variant: str | None) -> Path | None:
    """The weight file loaded from one model's subfolder (unet/, vae/, ...) of a folder of that variant."""
    files = [f for pattern in WEIGHT_FILE_PATTERNS for f in sorted(model_folder.glob(pattern))]
    return next((f for f in files if file_variant(f) == variant), None)
