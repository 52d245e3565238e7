"""SD1.5 from a default, pinned source, for a pushed Cog model whose image holds no weights (`cog push` from a clean
clone): Cog's setup fetches what weights_dir lacks (PUNKS_FETCH_AT_SETUP, set in cog.yaml) before loading.

The files are the fp16 safetensors of the diffusers layout, with their configs and tokenizer, at one fixed revision
of the Hub repo, each with its sha256 (as recorded for that revision by its Git LFS pointers and file listings):
a file that differs is removed and fails setup, never loaded. They download in parallel into `.part` files that a
later setup resumes (service/weights/fetch.py, the operator's download policy). PUNKS_BASE_MODEL_MIRROR serves the
same files from another https:// folder of the same layout. The LoRA comes from PUNKS_LORA_URL (cog.yaml's
`environment:`) when weights_dir lacks it, through the same fetch.
"""

import logging
from pathlib import Path

from service.config import SD15_FOLDER, Settings
from service.errors import WeightsError
from service.weights.fetch import FetchError, WeightFile, fetch_weights, operator_policy
from service.weights.resolve import folder_variant, model_weights
from service.weights.source import HUB_SCHEME, Source

log = logging.getLogger(__name__)

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_REVISION = "f03de327dd89b501a01da37fc5240cf4fdba85a1"
# What `weights download` takes (service/weights/download.py: SD15_PATTERNS), path -> sha256; ~2.1 GB in all.
SD15_SHA256 = {
    "model_index.json": "e2f6f22e274374010aec30c79eb2d6e53fff4a36ac0225523a92cb2d41a83347",
    "scheduler/scheduler_config.json": "699cce92eb7c122e2eb7dfdea78e6187fda76a5ed4a8e42319b85610e620e091",
    "text_encoder/config.json": "845df614cb9327ae7bbea027316246fae917827407da6df13572e41b5f93b4cc",
    "text_encoder/model.fp16.safetensors": "77795e2023adcf39bc29a884661950380bd093cf0750a966d473d1718dc9ef4e",
    "tokenizer/merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    "tokenizer/special_tokens_map.json": "c4864a9376a8401918425bed71fc14fc0e81f9b59ec45c1cf96cccb2df508eac",
    "tokenizer/tokenizer_config.json": "00439066fcba73de57644cf41e4e3b9f2dbb09d7f3fc2005898ba52399045882",
    "tokenizer/vocab.json": "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349",
    "unet/config.json": "78f474de6bab3d893868f37be97b636ae65c0df3073ed3256ca458ff599b5f96",
    "unet/diffusion_pytorch_model.fp16.safetensors": "c83908253f9a64d08c25fc90874c9c8aef9a329ce1ca5fb909d73b0c83d1ea21",
    "vae/config.json": "786a7d21647ddea6a04b9675c03d3cb45e90a2f3c6da5fbda2c54ade040036de",
    "vae/diffusion_pytorch_model.fp16.safetensors": "4fbcf0ebe55a0984f5a5e00d8c4521d52359af7229bb4d81890039d2aa16dd7c",
}
HOW_TO_FIX = (
    "Bake the weights into the image instead (`python -m service weights download`, then `cog push`; "
    "weights/README.md), or set PUNKS_BASE_MODEL_MIRROR / PUNKS_LORA_URL in cog.yaml's environment"
)


def sd15_files(mirror: str | None = None, files: dict[str, str] | None = None) -> list[WeightFile]:
    """The pinned files (`files`: path -> sha256, default SD15_SHA256), each at weights_dir/stable-diffusion-v1-5/
    <path>, from the Hub at the pinned revision or from `mirror` (an https:// folder of the same layout)."""
    files = SD15_SHA256 if files is None else files
    root = mirror.rstrip("/") if mirror else f"{HUB_SCHEME}{SD15_REPO}@{SD15_REVISION}"
    return [WeightFile(f"{SD15_FOLDER}/{path}", f"{root}/{path}", sha256) for path, sha256 in files.items()]


def fetch_missing_weights(settings: Settings, files: dict[str, str] | None = None) -> list[Path]:
    """Cog's setup with PUNKS_FETCH_AT_SETUP: download SD1.5 (unless weights_dir or PUNKS_BASE_MODEL has it) and
    the LoRA (when PUNKS_LORA_URL names one and its file is missing), in parallel; a no-op when all is there.
    WeightsError naming each failed file, the setting it came from and what to do instead."""
    wanted: list[tuple[WeightFile, str]] = []
    if not _holds_sd15(settings):
        setting = "PUNKS_BASE_MODEL_MIRROR" if settings.base_model_mirror else "the pinned SD1.5 source"
        wanted += [(file, setting) for file in sd15_files(settings.base_model_mirror, files)]
    lora = settings.lora_path()
    if settings.lora_url and not lora.is_file():
        wanted.append(
            (WeightFile.of(_relative(lora, settings.weights_dir), Source.parse(settings.lora_url)), "PUNKS_LORA_URL")
        )
    if not wanted:
        return []
    log.info("setup: fetching %d weight files into %s", len(wanted), settings.weights_dir)
    try:
        return fetch_weights(
            [file for file, _ in wanted], settings.weights_dir, operator_policy(), settings.download_workers
        )
    except FetchError as error:
        settings_used = sorted({setting for _, setting in wanted})
        raise WeightsError(f"{error}\n(from {', '.join(settings_used)}). {HOW_TO_FIX}.") from None


def _holds_sd15(settings: Settings) -> bool:
    """Whether SD1.5 is there to load: the operator's own PUNKS_BASE_MODEL (start-up judges it), the single-file
    checkpoint, or a diffusers folder with weights for each model (a download cut short leaves one without)."""
    if settings.base_model is not None:
        return True
    folder, single_file = settings.base_model_candidates()
    if single_file.is_file():
        return True
    variant = folder_variant(folder)
    models_loaded = ("unet", "vae", "text_encoder")
    return (folder / "model_index.json").is_file() and all(model_weights(folder / m, variant) for m in models_loaded)


def _relative(path: Path, weights_dir: Path) -> str:
    if not path.is_relative_to(weights_dir):
        raise WeightsError(f"PUNKS_LORA={path} lies outside PUNKS_WEIGHTS_DIR={weights_dir}: setup cannot fetch it")
    return path.relative_to(weights_dir).as_posix()
