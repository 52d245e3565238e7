"""`python -m service weights download`: fill weights/ with what the service loads.

SD1.5 comes in diffusers layout from the Hugging Face Hub, fp16 safetensors only (huggingface_hub resumes, shows
progress and fetches the files in parallel). The LoRA and the optional Real-ESRGAN model come from any source
service/weights/source.py takes (an https URL or an hf:// hub path, optionally pinned with #sha256=), through
the same fetch as PUNKS_WEIGHTS_URLS. Each run records what it wrote in weights/manifest.json.
"""

import time
from pathlib import Path

from service.config import MANIFEST_FILE, SD15_FOLDER, Settings
from service.weights.fetch import FetchError, WeightFile, fetch_one, operator_policy
from service.weights.manifest import ManifestEntry, manifest_entry, relative_path, write_manifest
from service.weights.resolve import SINGLE_FILE_SUFFIXES
from service.weights.source import HUB_SCHEME, Source

# What is taken from the diffusers repo: configs, the tokenizer and the fp16 weights of the three models the
# service runs. Not the .bin / full-precision / EMA duplicates, nor the safety checker.
SD15_PATTERNS = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
)
HUB_CACHE = ".cache"  # huggingface_hub's resume state inside a local_dir: not part of the model


def download_base_model(settings: Settings, revision: str | None = None) -> list[ManifestEntry]:
    """SD1.5's fp16 diffusers files into weights/stable-diffusion-v1-5 (or PUNKS_BASE_MODEL, a folder)."""
    from huggingface_hub import snapshot_download  # only when downloading

    folder = settings.base_model if settings.base_model is not None else settings.weights_dir / SD15_FOLDER
    if folder.suffix in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"PUNKS_BASE_MODEL={folder} is a single file; `weights download` fetches a diffusers folder")
    repo = settings.base_model_repo
    try:
        snapshot_download(repo, revision=revision, allow_patterns=list(SD15_PATTERNS), local_dir=folder)
    except OSError as error:  # the hub's HTTP and connection errors are OSErrors
        raise FetchError(f"SD1.5 from the Hugging Face Hub ({repo}) failed: {error}") from None
    files = sorted(f for f in folder.rglob("*") if f.is_file() and HUB_CACHE not in f.relative_to(folder).parts)
    at = f"@{revision}" if revision else ""
    source = f"{HUB_SCHEME}{repo}{at}"
    return [
        manifest_entry("base model", f, settings.weights_dir, f"{source}/{f.relative_to(folder).as_posix()}")
        for f in files
    ]


def download_file(what: str, source: Source, target: Path, weights_dir: Path) -> ManifestEntry:
    """One file into place (kept when already there and verified); FetchError names it."""
    path = fetch_one(WeightFile.of(relative_path(target, weights_dir), source), weights_dir, operator_policy())
    return manifest_entry(what, path, weights_dir, source.shown, source.sha256)


def download(
    settings: Settings,
    *,
    base: bool = True,
    revision: str | None = None,
    lora: str | None = None,
    realesrgan: str | None = None,
) -> list[ManifestEntry]:
    """Everything asked for (lora/realesrgan default to the settings); the manifest is written even when a
    later file fails, so what did arrive is recorded."""
    started = time.monotonic()
    lora = lora or settings.lora_url
    if realesrgan is None and settings.upscaler == "realesrgan":
        realesrgan = settings.realesrgan_url
    jobs = [("lora", lora, settings.lora_path()), ("realesrgan", realesrgan, settings.realesrgan_path())]
    sources = [(what, Source.parse(text), target) for what, text, target in jobs if text]  # fail before downloading
    entries: list[ManifestEntry] = []
    try:
        if base:
            entries += download_base_model(settings, revision)
        for what, source, target in sources:
            entries.append(download_file(what, source, target, settings.weights_dir))
    finally:
        if entries:
            write_manifest(settings.weights_dir, entries)
    print(
        f"{len(entries)} files ready in {settings.weights_dir} ({time.monotonic() - started:.0f}s); "
        f"manifest: {settings.weights_dir / MANIFEST_FILE}"
    )
    if not lora:
        print("note: no LoRA source given (--lora URL or PUNKS_LORA_URL): the LoRA was not downloaded")
    return entries
